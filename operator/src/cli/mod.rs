//! Subcommands of the `trellis` CLI, one module each.
pub mod bundle;
pub mod check;
pub mod crds;
pub mod dashboard;
pub mod dev;
pub mod inject;
pub mod stat;
