//! `trellis bundle`: writes the OLM bundle ([`crate::bundle`]) generated from `config/` and
//! `crds/`. The committed `bundle/` is this command's output; a test fails when it drifts.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::bundle::{self, Bundle, Dir, Options};

/// Arguments of `trellis bundle`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Operator version, X.Y.Z: names the ClusterServiceVersion (`trellis.vX.Y.Z`). Must match
    /// the operator image tag config/manager installs.
    #[arg(long)]
    pub version: String,
    /// Directory to write the bundle into (`manifests/`, `metadata/`, `tests/scorecard/`,
    /// `bundle.Dockerfile`). Files of an earlier bundle that this one no longer has are removed.
    #[arg(long, value_name = "DIR", default_value = "bundle")]
    pub out_dir: PathBuf,
    /// Root of the Trellis repository (where `config/` and `crds/` are).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub repo: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let built = bundle::build(
        &Dir(a.repo.clone()),
        &Options {
            version: a.version.clone(),
        },
    )?;
    write(&built, &a.out_dir)?;
    eprintln!(
        "trellis bundle: wrote {} files to {} ({} bytes compressed)",
        built.files.len(),
        a.out_dir.display(),
        bundle::validate::compressed_size(&built)
    );
    Ok(())
}

/// Writes every file and removes stale ones, so the directory equals the bundle. Only this
/// bundle's directories (and its Dockerfile) are touched.
pub fn write(b: &Bundle, dir: &std::path::Path) -> anyhow::Result<()> {
    if dir.exists() {
        let old = Bundle::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        for path in old.files.keys().filter(|p| !b.files.contains_key(*p)) {
            let owned = [
                bundle::MANIFESTS_DIR,
                bundle::METADATA_DIR,
                bundle::SCORECARD_DIR,
            ]
            .iter()
            .any(|d| path.starts_with(d));
            if owned {
                let p = dir.join(path);
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    for (path, text) in &b.files {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
