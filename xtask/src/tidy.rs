//! Tidy checks on the workspace's shape, run as ordinary tests by `cargo test` (so by `cargo xtask
//! ci`): every module opens with a `//!` doc saying what it is for, and no crate depends upward.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::root;

    /// The layers of ARCHITECTURE.md's code map, bottom first. A crate may depend (normally, for
    /// its tests or its build) only on crates of a lower layer.
    const LAYERS: [&[&str]; 5] = [
        &["starflow-data", "starflow-flows", "starflow-models"],
        &["starflow-training"],
        &["starflow-inference"],
        &["starflow-report"],
        &["starflow-cli", "starflow-python", "starflow-gpu-check"],
    ];

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    fn layer_of(name: &str) -> Option<usize> {
        LAYERS.iter().position(|l| l.contains(&name))
    }

    /// The package name and every `starflow-*` dependency named in a manifest, in any
    /// dependency table (normal, dev, build, target-specific).
    fn manifest(path: &Path) -> (String, Vec<String>) {
        let text = std::fs::read_to_string(path).unwrap();
        let (mut name, mut deps, mut table) = (String::new(), Vec::new(), String::new());
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                table = line.to_string();
            } else if table == "[package]" && line.starts_with("name") {
                name = line.split('"').nth(1).unwrap_or_default().to_string();
            } else if table.contains("dependencies") && line.starts_with("starflow-") {
                let dep = line.split(['.', ' ', '=']).next().unwrap().to_string();
                deps.push(dep);
            }
        }
        (name, deps)
    }

    #[test]
    fn every_module_opens_with_a_doc_comment() {
        let root = root();
        let mut files = Vec::new();
        for dir in std::fs::read_dir(root.join("crates")).unwrap().flatten() {
            rust_files(&dir.path().join("src"), &mut files);
        }
        rust_files(&root.join("xtask/src"), &mut files);
        assert!(files.len() > 50, "found only {} modules", files.len());
        let undocumented: Vec<_> = files
            .iter()
            .filter(|f| {
                !std::fs::read_to_string(f)
                    .unwrap()
                    .trim_start()
                    .starts_with("//!")
            })
            .collect();
        assert!(
            undocumented.is_empty(),
            "modules without a //! doc saying what they are for: {undocumented:?}"
        );
    }

    #[test]
    fn no_crate_depends_upward() {
        let mut seen = 0;
        for dir in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
            let toml = dir.path().join("Cargo.toml");
            if !toml.exists() {
                continue;
            }
            let (name, deps) = manifest(&toml);
            let own = layer_of(&name)
                .unwrap_or_else(|| panic!("{name}: add it to LAYERS (and ARCHITECTURE.md)"));
            for dep in deps {
                let theirs =
                    layer_of(&dep).unwrap_or_else(|| panic!("{name} -> {dep}: unknown crate"));
                assert!(
                    theirs < own,
                    "{name} (layer {own}) depends on {dep} (layer {theirs}): dependencies point down only"
                );
            }
            seen += 1;
        }
        assert_eq!(seen, LAYERS.iter().map(|l| l.len()).sum::<usize>());
    }

    #[test]
    fn the_manifest_reader_sees_dependencies_in_every_table() {
        let dir = std::env::temp_dir().join(format!("starflow-tidy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml = dir.join("Cargo.toml");
        std::fs::write(
            &toml,
            "[package]\nname = \"starflow-training\"\n[dependencies]\nstarflow-data.workspace = true\n\
             [dev-dependencies]\nstarflow-report = { path = \"../report\" }\n\
             [target.'cfg(unix)'.dependencies]\nstarflow-inference.workspace = true\n",
        )
        .unwrap();
        let (name, deps) = manifest(&toml);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(name, "starflow-training");
        assert_eq!(
            deps,
            ["starflow-data", "starflow-report", "starflow-inference"]
        );
    }
}
