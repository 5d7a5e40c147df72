//! What the cloud costs: token budgets now; GPU-hour accounting and the GPU lifecycle
//! controller join here.

pub mod budget;

pub use budget::{BudgetConfig, CloudBudget, OnExhausted};
