//! Embeds `deploy/crds/` and `deploy/control-plane/` (every `*.yaml`, in file-name order) so
//! `pylon install` prints exactly the manifests the repository ships.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut out = String::new();
    for (name, dir) in [("CRDS", "crds"), ("CONTROL_PLANE", "control-plane")] {
        let dir = root.join(dir);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        let _ = writeln!(out, "pub const {name}: &[(&str, &str)] = &[");
        for file in files {
            println!("cargo:rerun-if-changed={}", file.display());
            let _ = writeln!(
                out,
                "    ({:?}, include_str!({:?})),",
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                file.display().to_string()
            );
        }
        out.push_str("];\n");
    }
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap_or_default()).join("manifests.rs");
    if let Err(e) = std::fs::write(&dest, out) {
        panic!("cannot write {}: {e}", dest.display());
    }
}
