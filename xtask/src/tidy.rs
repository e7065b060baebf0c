//! Tidy checks on the workspace's shape, run as ordinary tests by `cargo test` (so by `cargo xtask
//! ci`): every module opens with a `//!` doc saying what it is for, no crate depends upward, and
//! no two modules of a crate use each other (directly or round a longer loop).

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

    /// The modules of a crate's `src` (a file or a directory's first component; not `lib` or
    /// `main`, the root that declares them) and, per module, the others it names as
    /// `crate::<module>` outside comments and `#[cfg(test)]` code (tests may reach anywhere).
    fn module_graph(src: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
        use std::collections::BTreeMap;
        let mut files = Vec::new();
        rust_files(src, &mut files);
        let module = |f: &Path| -> String {
            let rel = f.strip_prefix(src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            first.trim_end_matches(".rs").to_string()
        };
        let mut graph: BTreeMap<String, Vec<String>> = files
            .iter()
            .map(|f| module(f))
            .filter(|m| m != "lib" && m != "main")
            .map(|m| (m, Vec::new()))
            .collect();
        for f in &files {
            let from = module(f);
            if !graph.contains_key(&from) {
                continue;
            }
            let text = std::fs::read_to_string(f).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let mut uses = Vec::new();
            for line in code.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
                uses.extend(named_modules(line).filter(|m| graph.contains_key(m) && *m != from));
            }
            let entry = graph.get_mut(&from).unwrap();
            entry.extend(uses);
            entry.sort();
            entry.dedup();
        }
        graph
    }

    /// The identifiers right after `crate::` in a line, and those inside a `crate::{...}` group.
    fn named_modules(line: &str) -> impl Iterator<Item = String> + '_ {
        line.match_indices("crate::").flat_map(move |(at, _)| {
            let rest = &line[at + "crate::".len()..];
            let group = rest
                .strip_prefix('{')
                .map(|g| g.split('}').next().unwrap_or(g));
            let names: Vec<String> = match group {
                Some(g) => g
                    .split(',')
                    .map(|p| p.trim().split("::").next().unwrap_or("").to_string())
                    .collect(),
                None => vec![rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")
                    .to_string()],
            };
            names.into_iter()
        })
    }

    /// A loop in `graph`, as the modules along it, if there is one (depth-first search).
    fn find_cycle(graph: &std::collections::BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
        fn visit(
            m: &str,
            graph: &std::collections::BTreeMap<String, Vec<String>>,
            path: &mut Vec<String>,
            done: &mut std::collections::BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|p| p == m) {
                let mut cycle = path[at..].to_vec();
                cycle.push(m.to_string());
                return Some(cycle);
            }
            if done.contains(m) {
                return None;
            }
            path.push(m.to_string());
            for next in &graph[m] {
                if let Some(c) = visit(next, graph, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(m.to_string());
            None
        }
        let mut done = std::collections::BTreeSet::new();
        graph
            .keys()
            .find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
    }

    #[test]
    fn no_module_cycle_within_a_crate() {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("crates"))
            .unwrap()
            .flatten()
            .map(|d| d.path().join("src"))
            .collect();
        dirs.push(root().join("xtask/src"));
        for src in dirs.iter().filter(|d| d.exists()) {
            let graph = module_graph(src);
            if let Some(cycle) = find_cycle(&graph) {
                panic!(
                    "{}: modules use each other in a loop: {}; move what both need into a module \
                     below them",
                    src.display(),
                    cycle.join(" -> ")
                );
            }
        }
    }

    #[test]
    fn the_module_graph_reader_sees_paths_and_groups_and_finds_loops() {
        let names: Vec<String> =
            named_modules("use crate::{alpha::A, beta}; let x = crate::gamma::f();").collect();
        assert_eq!(names, ["alpha", "beta", "gamma"]);
        let graph = |edges: &[(&str, &str)]| {
            let mut g = std::collections::BTreeMap::<String, Vec<String>>::new();
            for (a, b) in edges {
                g.entry(a.to_string()).or_default().push(b.to_string());
                g.entry(b.to_string()).or_default();
            }
            g
        };
        assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "c")])), None);
        assert_eq!(
            find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
            Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
    }
}
