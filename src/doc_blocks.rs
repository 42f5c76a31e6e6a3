//! The documentation's code blocks and reference tables, read for the unit tests that hold them
//! to the code (test builds only; the test threads). Every YAML, shell and unit-file block in
//! README.md, BENCHMARKS.md and the book (`docs/src`) names, in an HTML comment on the line
//! before it, the check that runs it: `<!-- check: config -->`.

use std::fs;
use std::path::{Path, PathBuf};

/// Each check a block may name: its kind, the fence's language, and who runs it.
pub const CHECKS: &[(&str, &str, &str)] = &[
    (
        "config",
        "yaml",
        "src/config.rs: parsed, and accepted, by the parser",
    ),
    (
        "systemd",
        "ini",
        "src/cli.rs: ExecStart's arguments parsed by the CLI",
    ),
    (
        "quick-start",
        "sh",
        "tests/integration/readme.rs: run as written",
    ),
    (
        "quick-start-output",
        "text",
        "tests/integration/readme.rs: compared with the output",
    ),
    (
        "manifest",
        "yaml",
        ".ci/check-docs: validated against Kubernetes 1.37's schemas",
    ),
    (
        "container-fragment",
        "yaml",
        ".ci/check-docs: validated as a Pod's container",
    ),
    (
        "pod-spec-fragment",
        "yaml",
        ".ci/check-docs: validated as a Pod's spec",
    ),
    (
        "shell",
        "sh",
        ".ci/check-docs: bash -n, shellcheck, and the paths it names exist",
    ),
];

/// Fence languages whose blocks must name a check.
const CHECKED_LANGUAGES: &[&str] = &["yaml", "yml", "sh", "bash", "shell", "console", "ini"];

#[derive(Debug)]
pub struct Block {
    /// Where the block opens: `docs/src/dra.md:12`.
    pub place: String,
    pub language: String,
    pub check: Option<String>,
    pub text: String,
}

/// The checkout the tests run in. Cargo names it at run time too, and that answer wins: a crate
/// moved beside a warm target directory is not rebuilt, so the built-in path may name another.
fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Every Markdown file of the documentation, relative to the repository.
pub fn files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("README.md"), PathBuf::from("BENCHMARKS.md")];
    let mut book: Vec<PathBuf> = fs::read_dir(root().join("docs/src"))
        .expect("docs/src is readable")
        .map(|e| e.expect("docs/src lists").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| {
            p.strip_prefix(root())
                .expect("under the repository")
                .to_owned()
        })
        .collect();
    book.sort();
    files.extend(book);
    files
}

pub fn read(file: &Path) -> String {
    fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// The fenced blocks of one file, with their indentation taken off.
pub fn blocks_of(file: &Path, text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().enumerate();
    let mut previous = "";
    while let Some((i, line)) = lines.next() {
        let trimmed = line.trim_start();
        let Some(language) = trimmed.strip_prefix("```") else {
            previous = line;
            continue;
        };
        let indent = line.len() - trimmed.len();
        let check = previous
            .trim()
            .strip_prefix("<!-- check: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
            .map(str::to_owned);
        let mut body = String::new();
        for (_, line) in lines.by_ref() {
            if line.trim_start().starts_with("```") {
                break;
            }
            body.push_str(line.get(indent..).unwrap_or(line.trim_start()));
            body.push('\n');
        }
        blocks.push(Block {
            place: format!("{}:{}", file.display(), i + 1),
            language: language.trim().to_owned(),
            check,
            text: body,
        });
        previous = "";
    }
    blocks
}

/// Every block of the documentation.
pub fn blocks() -> Vec<Block> {
    files()
        .iter()
        .flat_map(|f| blocks_of(f, &read(f)))
        .collect()
}

/// The blocks that name `check`.
pub fn checked(check: &str) -> Vec<Block> {
    blocks()
        .into_iter()
        .filter(|b| b.check.as_deref() == Some(check))
        .collect()
}

/// The cells of the Markdown table that follows `<!-- {marker} -->` in `file`, header and
/// separator left out.
pub fn table(file: &str, marker: &str) -> Vec<Vec<String>> {
    let text = read(Path::new(file));
    let comment = format!("<!-- {marker} -->");
    let (_, after) = text
        .split_once(&comment)
        .unwrap_or_else(|| panic!("{file} has no {comment}"));
    after
        .trim_start()
        .lines()
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The first cell of each row, without its backquotes: the keys or flags the table documents.
pub fn first_column(file: &str, marker: &str) -> std::collections::BTreeSet<String> {
    table(file, marker)
        .iter()
        .map(|row| row[0].trim_matches('`').to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_yaml_shell_and_unit_block_names_a_check_of_its_language() {
        let mut wrong = Vec::new();
        for b in blocks() {
            match (
                &b.check,
                CHECKS.iter().find(|c| Some(c.0) == b.check.as_deref()),
            ) {
                (Some(_), Some((_, language, _))) if *language == b.language => {}
                (Some(check), Some((_, language, _))) => wrong.push(format!(
                    "{}: check {check} is for {language} blocks, not {}",
                    b.place, b.language
                )),
                (Some(check), None) => {
                    wrong.push(format!("{}: no check is called {check}", b.place));
                }
                (None, _) if CHECKED_LANGUAGES.contains(&b.language.as_str()) => wrong.push(
                    format!("{}: a {} block that names no check", b.place, b.language),
                ),
                (None, _) => {}
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn every_check_has_a_block_to_check() {
        let blocks = blocks();
        for (check, _, _) in CHECKS {
            assert!(
                blocks.iter().any(|b| b.check.as_deref() == Some(*check)),
                "no block names the check {check}"
            );
        }
    }

    #[test]
    fn a_block_is_read_with_its_marker_and_without_its_indentation() {
        let text =
            "text\n<!-- check: systemd -->\n  ```ini\n  [Unit]\n  A=b\n  ```\n```\nplain\n```\n";
        let b = blocks_of(Path::new("x.md"), text);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].place, "x.md:3");
        assert_eq!(b[0].check.as_deref(), Some("systemd"));
        assert_eq!(b[0].language, "ini");
        assert_eq!(b[0].text, "[Unit]\nA=b\n");
        assert_eq!((b[1].check.as_deref(), b[1].language.as_str()), (None, ""));
    }
}
