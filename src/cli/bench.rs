//! `turbine bench` (placeholder until implemented).

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`turbine bench` is not implemented yet")
}
