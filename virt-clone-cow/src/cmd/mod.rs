//! The commands: each owns its request type, its errors and its report.

pub mod clone;
pub mod compress;
pub mod flatten;
pub mod gc;
pub mod publish;
pub mod tree;
