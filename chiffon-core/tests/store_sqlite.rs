#![cfg(feature = "sqlite")]
//! The store conformance suite against SQLite: a temporary database file per test, and
//! again against `sqlite::memory:`; plus `store::connect` URL handling and two store
//! instances sharing one file.

use chiffon_core::model::{NewRequest, RequestStatus};
use chiffon_core::store::conformance::{self, Harness};
use chiffon_core::store::sqlite::SqliteStore;
use chiffon_core::store::{self, StoreError};
use std::sync::Arc;
use uuid::Uuid;

/// A fresh database in a temporary folder (a nested path: connect creates the folders).
async fn file_store() -> Option<Harness> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}",
        dir.path().join("nested/dir/chiffon.db").display()
    );
    let store = SqliteStore::connect(&url).await.unwrap();
    Some(Harness::new(store, dir))
}

chiffon_core::store_conformance_tests!(file_store);

mod memory {
    use super::*;

    async fn memory_store() -> Option<Harness> {
        let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
        Some(Harness::new(store, ()))
    }

    chiffon_core::store_conformance_tests!(memory_store);
}

#[tokio::test]
async fn connect_creates_the_folder_and_data_persists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/chiffon.db");
    let url = format!("sqlite://{}", path.display());
    let s = store::connect(&url).await.unwrap();
    assert_eq!(s.backend(), "sqlite");
    assert!(path.exists());
    let req = s
        .create_request(&NewRequest {
            id: Uuid::new_v4(),
            trace_id: "t".into(),
            text: "persist me".into(),
            requester: "alice".into(),
            submitted_by: "alice".into(),
            dry_run: true,
        })
        .await
        .unwrap();
    drop(s);
    let again = SqliteStore::connect(&url).await.unwrap();
    let got = chiffon_core::store::Requests::get_request(&again, req.id)
        .await
        .unwrap();
    assert_eq!(got, req);
    assert_eq!(got.status, RequestStatus::Planning);
    again.close().await;
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    for url in ["mysql://localhost/x", "chiffon.db", ""] {
        match store::connect(url).await {
            Err(e @ StoreError::Unavailable(_)) => {
                assert!(e.to_string().contains("unsupported database URL"), "{e}")
            }
            Err(e) => panic!("{url}: unexpected error {e}"),
            Ok(_) => panic!("{url}: accepted"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    let a = SqliteStore::connect(&url).await.unwrap();
    let b = SqliteStore::connect(&url).await.unwrap();
    conformance::two_instances(Arc::new(a), Arc::new(b)).await;
}
