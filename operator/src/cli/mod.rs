//! Subcommands of the `trellis` CLI, one module each.
pub mod check;
pub mod crds;
pub mod dev;
pub mod inject;
