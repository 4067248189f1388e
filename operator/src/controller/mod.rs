//! Controllers: thin loops that feed reflector stores to pure reconcile functions and apply
//! the result.

pub mod compile;
pub mod compile_apply;
