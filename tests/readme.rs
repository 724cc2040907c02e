//! Every TOML snippet in README.md is a valid configuration, as written: a new user's
//! first try is a copied snippet. (A snippet naming a CA file on the reader's machine,
//! `backend.tls_ca`, may only fail because that file is not on this one.)

use tollgate::RateLimitConfig;

fn toml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        match &mut current {
            None if line.trim_start() == "```toml" => current = Some((n + 1, String::new())),
            Some(_) if line.trim_start() == "```" => blocks.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[test]
fn every_toml_snippet_in_the_readme_is_a_valid_config() {
    let readme = include_str!("../README.md");
    let blocks = toml_blocks(readme);
    assert!(blocks.len() >= 4, "found only {} toml blocks", blocks.len());
    for (line, text) in blocks {
        if let Err(err) = RateLimitConfig::from_toml_str(&text) {
            for (field, message) in err.problems() {
                assert!(
                    field == "backend.tls_ca" && message.starts_with("cannot read"),
                    "README.md line {line}: {field}: {message}\n{text}"
                );
            }
        }
    }
}
