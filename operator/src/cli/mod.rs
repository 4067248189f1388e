//! Subcommands of the `trellis` CLI, one module each.
pub mod bundle;
pub mod crds;
pub mod dev;
pub mod inject;
