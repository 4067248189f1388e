//! `trellis inject` and `trellis uninject`.
#[derive(clap::Args, Debug)]
pub struct InjectArgs {}
#[derive(clap::Args, Debug)]
pub struct UninjectArgs {}

pub fn run_inject(_a: InjectArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn run_uninject(_a: UninjectArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
