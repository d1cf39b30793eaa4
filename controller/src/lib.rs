//! (in progress)

pub mod identity;
