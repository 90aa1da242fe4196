//! `nodeherd man`: one man page for the binary and every subcommand.
//!
//! clap_mangen renders a page per command and points the top one at
//! `nodeherd-run(1)` and friends. One page is easier to ship and to read, so
//! the subcommands' synopses and options become sections of `nodeherd(1)`,
//! all still generated from the clap definition in `cli.rs`.

use std::io::{self, Write};

use clap::CommandFactory;
use clap_mangen::Man;

use crate::cli::Cli;

pub fn render(w: &mut dyn Write) -> io::Result<()> {
    let cmd = Cli::command();
    let man = Man::new(cmd.clone());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    writeln!(w, ".SH COMMANDS")?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("nodeherd {}", sub.get_name());
        writeln!(w, ".SS \"{name}\"")?;
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            writeln!(w, "{}", escape(&about.to_string()))?;
        }
        let sub = sub.clone().bin_name(name);
        let mut part = Vec::new();
        let sub_man = Man::new(sub);
        sub_man.render_synopsis_section(&mut part)?;
        sub_man.render_options_section(&mut part)?;
        // Their section headings become paragraphs inside this subsection.
        let part = String::from_utf8_lossy(&part)
            .replace(".SH SYNOPSIS\n", ".PP\n")
            .replace(".SH OPTIONS\n", ".PP\nOptions:\n");
        w.write_all(part.as_bytes())?;
    }
    writeln!(w, ".SH EXIT STATUS")?;
    writeln!(
        w,
        "{}",
        escape(
            "run: 0 after a clean stop, 1 when every slot errored or a runtime failure, 2 for bad configuration or flags, \
             4 under systemd when the app's bus name is owned by another process or the bus policy does not let \
             the app's user own it. \
             status, reload, restart, scale, stop, logs: 0 done, 1 the operation failed, 2 bad usage or invalid argument, \
             3 no manager reachable (the message names the apps that run), or the bus name's owner is not the main \
             process of the app's unit, \
             4 busy (64 requests already wait), 5 access denied (the message names the polkit action, or the user \
             whose manager `stop` may not signal). \
             A reload whose configuration file is missing or invalid is refused with status 2. \
             start: as run in the foreground; 1 when the app runs already or its unit did not start, 2 for a name \
             neither a file nor an installed app. \
             The PM2 commands nodeherd has no need of (save, startup, kill, ...) exit 2 with what to do instead. \
             install, uninstall: 0 done, 1 systemctl, systemd-sysusers or writing failed, 2 refused (invalid file, \
             an app name that cannot be a user name, no right to write, a file install did not write)."
        )
    )?;
    writeln!(w, ".SH SEE ALSO")?;
    writeln!(
        w,
        "systemd.socket(5), systemd.service(5), busctl(1), journalctl(1)"
    )?;
    man.render_version_section(w)
}

/// Escape text for roff: backslashes, and a leading dot or quote.
fn escape(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_page_names_no_missing_pages() {
        let mut out = Vec::new();
        super::render(&mut out).unwrap();
        let page = String::from_utf8(out).unwrap();
        assert!(
            !page.contains("nodeherd\\-run(1)"),
            "points at a page that does not exist"
        );
        for sub in [
            "run", "start", "stop", "delete", "ls", "logs", "status", "reload", "restart", "scale",
        ] {
            assert!(
                page.contains(&format!(".SS \"nodeherd {sub}\"")),
                "{sub} missing"
            );
        }
        assert!(page.contains("\\-\\-listen"), "run's options are in");
        assert!(page.contains(".SH EXIT STATUS"));
    }
}
