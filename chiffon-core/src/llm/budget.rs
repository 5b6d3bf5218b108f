//! [`Budget`]: a provider's monthly budget, kept in the [`Store`] so it holds across
//! restarts and across orchestrator instances.
//!
//! Before a call, its worst-case cost (estimated prompt tokens plus `max_tokens` at the
//! provider's prices) is reserved atomically for the current UTC month; after it, the
//! reservation is settled to the real cost: 0 when the provider refused the call (refused
//! calls are not billed), the worst case when the answer timed out or broke off (the
//! provider may have billed it). Concurrent callers, even on several instances, can
//! therefore never spend more than the budget together, as long as providers bill within
//! what was asked (every provider sends the reserved `max_tokens`). A provider that bills more anyway has the
//! overage recorded in full; once spend reaches the budget no reservation fits, so the
//! provider is closed for the month and no call is started.
//!
//! A reservation carries a lease ([`Budget::with_lease`]): one left open by a process that
//! crashed mid-call stops counting once the lease has passed, instead of shrinking the
//! month's budget for good.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::{current_month, Completion, CompletionRequest, LlmError, LlmProvider, Pricing};
use crate::model::{
    micros_to_usd, usd_to_micros, LlmReservation, LlmSettlement, Reservation,
    DEFAULT_RESERVATION_LEASE,
};
use crate::store::Store;

/// Wraps a provider with a monthly budget.
pub struct Budget<P> {
    inner: P,
    store: Arc<dyn Store>,
    budget_micros: i64,
    lease: Duration,
}

impl<P> std::fmt::Debug for Budget<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("budget_micros", &self.budget_micros)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl<P: LlmProvider> Budget<P> {
    /// `monthly_budget_usd: None` records spend without a limit.
    pub fn new(inner: P, store: Arc<dyn Store>, monthly_budget_usd: Option<f64>) -> Self {
        let budget_micros = match monthly_budget_usd {
            Some(usd) if usd.is_finite() => usd_to_micros(usd.max(0.0)),
            _ => i64::MAX,
        };
        Budget {
            inner,
            store,
            budget_micros,
            lease: DEFAULT_RESERVATION_LEASE,
        }
    }

    /// How long a reservation holds budget unless settled (default
    /// [`DEFAULT_RESERVATION_LEASE`]). Make it longer than a call can take: the provider's
    /// timeout times the retries, plus their pauses.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// The budget in micro-dollars (`i64::MAX`: unlimited).
    pub fn budget_micros(&self) -> i64 {
        self.budget_micros
    }
}

/// Settles a reservation that was not settled normally (the call's future was dropped,
/// for instance when a request is cancelled mid-call), so it does not hold budget until
/// its lease passes. The call may have gone out and been billed: it counts its worst case.
struct Pending {
    store: Arc<dyn Store>,
    id: Option<Uuid>,
    amount: i64,
}

/// Settles, retrying while the store is unavailable: a settlement lost for good would let
/// the reservation lapse at its lease with the real cost never counted.
async fn settle_with_retries(store: &dyn Store, id: Uuid, s: &LlmSettlement) {
    let mut pause = Duration::from_millis(100);
    for attempt in 1..=5 {
        match store.settle_llm(id, s).await {
            Ok(()) => return,
            Err(e) if e.is_transient() && attempt < 5 => {
                tracing::debug!(reservation = %id, error = %e, "retrying llm settlement");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => {
                // The reservation keeps counting its worst case until its lease passes.
                tracing::warn!(reservation = %id, error = %e, "cannot settle llm reservation");
                return;
            }
        }
    }
}

impl Pending {
    async fn settle(mut self, s: LlmSettlement) {
        if let Some(id) = self.id.take() {
            settle_with_retries(&*self.store, id, &s).await;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let store = self.store.clone();
        let amount = self.amount;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let s = LlmSettlement {
                    input_tokens: 0,
                    output_tokens: 0,
                    cost_micros: amount,
                    ok: false,
                };
                settle_with_retries(&*store, id, &s).await;
            });
        }
    }
}

#[async_trait]
impl<P: LlmProvider> LlmProvider for Budget<P> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    fn pricing(&self) -> Pricing {
        self.inner.pricing()
    }

    async fn complete(&self, req: CompletionRequest) -> Result<Completion, LlmError> {
        let amount = self.inner.pricing().worst_case_micros(&req);
        let reservation = LlmReservation {
            provider: self.inner.name().to_string(),
            model: self.inner.model().to_string(),
            month: current_month(),
            amount_micros: amount,
            budget_micros: self.budget_micros,
            request_id: req.request_id,
            lease: self.lease,
        };
        let id = match self
            .store
            .reserve_llm(&reservation)
            .await
            .map_err(LlmError::Store)?
        {
            Reservation::Reserved { id } => id,
            Reservation::OverBudget {
                spent_micros,
                reserved_micros,
            } => {
                return Err(LlmError::BudgetExhausted {
                    provider: self.inner.name().to_string(),
                    budget_usd: micros_to_usd(self.budget_micros),
                    spent_usd: micros_to_usd(spent_micros),
                    reserved_usd: micros_to_usd(reserved_micros),
                    needed_usd: micros_to_usd(amount),
                })
            }
        };
        let pending = Pending {
            store: self.store.clone(),
            id: Some(id),
            amount,
        };
        let result = self.inner.complete(req).await;
        let settlement = match &result {
            Ok(c) => LlmSettlement {
                input_tokens: c.input_tokens,
                output_tokens: c.output_tokens,
                cost_micros: c.cost_micros,
                ok: true,
            },
            // Sent, but the answer never came: the provider may have done the work and
            // billed it, so the worst case counts (the cap holds whatever it billed).
            Err(e) if e.may_be_billed() => LlmSettlement {
                input_tokens: 0,
                output_tokens: 0,
                cost_micros: amount,
                ok: false,
            },
            // Refused (4xx, 5xx, 429) or never sent: not billed.
            Err(_) => LlmSettlement {
                input_tokens: 0,
                output_tokens: 0,
                cost_micros: 0,
                ok: false,
            },
        };
        pending.settle(settlement).await;
        result
    }

    fn record_rejection(&self, error: &LlmError) {
        self.inner.record_rejection(error)
    }
}
