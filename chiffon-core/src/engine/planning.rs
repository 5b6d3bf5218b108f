//! The engine's view of the planner: [`CatalogPlanner`] binds [`crate::planner::Planner`]
//! to one catalog as a [`PlanProvider`]. What it returns is the planner's own outcome; the
//! engine turns it into audit entries ([`crate::audit::entries::planning`]).

use std::sync::Arc;

use async_trait::async_trait;

use super::{PlanError, PlanInput, PlanOutcome, PlanProvider};
use crate::catalog::Catalog;
use crate::planner::{PlanOptions, Planner};

/// The real planner over one catalog.
#[derive(Clone)]
pub struct CatalogPlanner {
    planner: Planner,
    catalog: Arc<Catalog>,
}

impl CatalogPlanner {
    pub fn new(planner: Planner, catalog: Arc<Catalog>) -> Self {
        CatalogPlanner { planner, catalog }
    }
}

#[async_trait]
impl PlanProvider for CatalogPlanner {
    async fn plan(&self, input: &PlanInput) -> Result<PlanOutcome, PlanError> {
        let opts = PlanOptions {
            dry_run: input.dry_run,
            request_id: Some(input.request_id),
        };
        self.planner.plan(&self.catalog, &input.text, &opts).await
    }
}
