//! Build-time generator for the Debian package (`cargo xtask deb`), never
//! installed: writes, into the directory given as its one argument,
//! - `man/smtpguard.8` and one `man/smtpguard-<command>.8` per subcommand
//!   (nested ones joined with `-`), from the clap definitions
//!   ([`clap_mangen`]), so the pages can never drift from `--help`;
//! - `man/smtpguard.toml.5`, from the README's configuration reference
//!   table, the one place the keys are documented for operators;
//! - `completions/smtpguard.bash`, `_smtpguard` (zsh) and
//!   `smtpguard.fish` ([`clap_complete`]).

use std::fs;
use std::io::{self, Write as _};
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;
use smtpguard::cli::Cli;

/// The README, whose "Configuration reference" section becomes
/// smtpguard.toml(5).
const README: &str = include_str!("../../../README.md");

fn main() -> io::Result<()> {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: smtpguard-docs OUT_DIR");
        std::process::exit(2);
    };
    let out = Path::new(&out);
    let man = out.join("man");
    let completions = out.join("completions");
    fs::create_dir_all(&man)?;
    fs::create_dir_all(&completions)?;

    // No `help` subcommand in the pages: it has no page of its own.
    let mut cmd = without_help(Cli::command());
    cmd.build();
    write_pages(&cmd, "smtpguard", &man)?;
    fs::write(man.join("smtpguard.toml.5"), config_page(README))?;

    for (shell, file) in [
        (Shell::Bash, "smtpguard.bash"),
        (Shell::Zsh, "_smtpguard"),
        (Shell::Fish, "smtpguard.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "smtpguard", &mut buf);
        fs::write(completions.join(file), buf)?;
    }
    Ok(())
}

/// `cmd` and its subcommands without clap's `help` subcommand.
fn without_help(cmd: clap::Command) -> clap::Command {
    cmd.disable_help_subcommand(true)
        .mut_subcommands(without_help)
}

/// smtpguard(8) and a page per subcommand, recursively: `name` is the
/// page's name (`smtpguard-deny-add`).
fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> io::Result<()> {
    // clap names are `&'static str` without its "string" feature; a
    // one-shot build tool may leak them.
    let page = cmd.clone().name(&*name.to_string().leak());
    let mut buf = Vec::new();
    clap_mangen::Man::new(page)
        .section("8")
        .manual("smtpguard")
        .render(&mut buf)?;
    fs::File::create(dir.join(format!("{name}.8")))?.write_all(&buf)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

/// smtpguard.toml(5) in roff: the README's "Configuration reference"
/// section, its table turned into one tagged paragraph per key.
fn config_page(readme: &str) -> String {
    let section = readme
        .split("\n## Configuration reference\n")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("README has a Configuration reference section");
    let mut page = String::from(
        ".TH SMTPGUARD.TOML 5 \"\" \"smtpguard\" \"File Formats\"\n\
         .SH NAME\nsmtpguard.toml \\- configuration of the smtpguard daemon\n\
         .SH SYNOPSIS\n/etc/smtpguard/smtpguard.toml\n.SH DESCRIPTION\n",
    );
    let mut keys = String::new();
    let mut in_code = false;
    for line in section.lines() {
        let line = line.trim();
        // Code blocks would run into the prose; the README keeps them.
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        if let Some(row) = line.strip_prefix('|') {
            let cells: Vec<&str> = row.trim_end_matches('|').split(" | ").collect();
            let [key, default, meaning] = cells[..] else {
                continue;
            };
            let key = key.trim();
            if key == "key" || key.starts_with("---") {
                continue;
            }
            keys.push_str(&format!(
                ".TP\n.B {}\nDefault: {}. {}\n",
                roff(&unquote(key)),
                roff(&unquote(default.trim())),
                roff(&unquote(meaning.trim()))
            ));
        } else if !line.is_empty() && keys.is_empty() {
            page.push_str(&roff(&unquote(line)));
            page.push('\n');
        }
    }
    page.push_str(".SH KEYS\n");
    page.push_str(&keys);
    page.push_str(
        ".SH FILES\n/etc/smtpguard/smtpguard.toml\n.SH SEE ALSO\n\
         .BR smtpguard (8),\n.BR smtpguard-config (8)\n",
    );
    page
}

/// Markdown code spans and links to plain text.
fn unquote(text: &str) -> String {
    text.replace('`', "")
}

/// Escapes what roff would read as requests or escapes.
fn roff(text: &str) -> String {
    let text = text.replace('\\', "\\\\").replace('-', "\\-");
    match text.starts_with(['.', '\'']) {
        true => format!("\\&{text}"),
        false => text,
    }
}
