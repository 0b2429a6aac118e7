//! Model families. A model never prints, parses flags or touches files other than its weights.

pub mod umt5;
pub mod wan;
