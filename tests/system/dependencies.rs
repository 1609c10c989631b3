//! The domain crate stays pure: no async runtime, database, web or messaging crate may
//! appear anywhere in its dependency tree (dev-dependencies included).

use std::process::Command;

const FORBIDDEN: &[&str] = &[
    "tokio",
    "sqlx",
    "axum",
    "async-nats",
    "cqrs-es",
    "postgres-es",
];

#[test]
fn the_domain_dependency_tree_has_no_io_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "hindsight-domain",
            "-e",
            "normal,build,dev",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(tree.contains("hindsight-domain"), "unexpected tree: {tree}");
    let offending: Vec<&str> = tree
        .lines()
        .filter(|line| {
            let name = line.split_whitespace().next().unwrap_or_default();
            FORBIDDEN.contains(&name)
        })
        .collect();
    assert!(
        offending.is_empty(),
        "the domain crate depends on IO crates: {offending:?}"
    );
}
