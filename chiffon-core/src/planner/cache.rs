//! The plan cache's key: the same normalised request against the same catalog (and the
//! same dry-run flag) reuses the plan made before.

use sha2::{Digest, Sha256};

/// Lowercased, whitespace collapsed to single spaces, trimmed.
pub fn normalise(text: &str) -> String {
    text.split_whitespace()
        .map(|w| w.to_lowercase())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `sha256(normalised text, catalog fingerprint, dry_run)`, hex.
pub fn cache_key(text: &str, catalog_fingerprint: &str, dry_run: bool) -> String {
    let mut h = Sha256::new();
    h.update(b"chiffon-plan-v1\n");
    h.update(normalise(text).as_bytes());
    h.update(b"\n");
    h.update(catalog_fingerprint.as_bytes());
    h.update(if dry_run { b"\n1" } else { b"\n0" });
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(normalise("  Deploy\tKuma \n on NAS "), "deploy kuma on nas");
        let k = cache_key("Deploy kuma", "fp", false);
        assert_eq!(k.len(), 64);
        assert_eq!(k, cache_key("  deploy   KUMA ", "fp", false));
        assert_ne!(k, cache_key("deploy kuma", "fp2", false));
        assert_ne!(k, cache_key("deploy kuma", "fp", true));
        assert_ne!(k, cache_key("deploy kuma now", "fp", false));
    }
}
