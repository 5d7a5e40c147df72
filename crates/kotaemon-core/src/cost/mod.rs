//! What the cloud costs: budgets (tokens per window, USD per day and month, globally and per
//! client), the price table, and the usage ledger.

pub mod budget;
pub mod ledger;
/// The cloud-GPU lifecycle controller: start on demand, stop when idle, within a schedule.
pub mod lifecycle;
pub mod pricing;

pub use budget::{BudgetConfig, CloudBudget, OnExhausted, SpendLimits};
pub use ledger::Ledger;
pub use pricing::UsageConfig;
