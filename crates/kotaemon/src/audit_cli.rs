//! `kotaemon audit`: checks the audit log's hash chains.

use clap::Subcommand;
use kotaemon_core::Config;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Verify every series in the audit directory: no line edited, removed or torn.
    Verify {
        /// Audit directory (default: [audit] dir of the configuration).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub fn run(cmd: AuditCmd, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Verify { dir } => {
            let dir = match dir {
                Some(d) => d,
                None => Config::load(config)?.audit.dir(),
            };
            match kotaemon_core::audit::verify_dir(&dir) {
                Ok(reports) => {
                    for r in &reports {
                        let start = if r.from_start {
                            "from its start".to_string()
                        } else {
                            format!("from seq {} (older files rotated away)", r.first_seq)
                        };
                        println!(
                            "ok    {}: {} records in {} file(s), chain intact {start}",
                            r.series, r.records, r.files
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("FAIL  {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}
