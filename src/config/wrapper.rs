//! `script: 'npm', args: 'start'`, as many PM2 users start their apps, and
//! commands from `node_modules/.bin` (`script: 'next', args: 'start'`).
//!
//! A wrapper process between the manager and node would hold the worker's
//! pid, its IPC channel and its sockets, and the app's own node process
//! would get none of them (PM2 breaks on exactly this in cluster mode). So
//! nodeherd reads the package's script and runs the node command it names
//! directly: `"start": "NODE_ENV=production node --enable-source-maps
//! dist/server.js --port 3000"` becomes node with `--enable-source-maps`,
//! the script `dist/server.js`, its arguments, and `NODE_ENV` in the
//! environment. A script nodeherd cannot run that way (a pipeline, `&&`, a
//! command that is not node) is refused at start with what to write instead.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The node command a package script runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCommand {
    pub node_args: Vec<String>,
    /// The file to run, relative to the app's directory or absolute.
    pub script: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Package managers whose `start`/`run` scripts are resolved.
pub fn is_package_manager(script: &str) -> bool {
    matches!(script, "npm" | "yarn" | "pnpm")
}

/// `node_modules/.bin/NAME` under `cwd`, if the app has such a command.
pub fn bin_command(cwd: &Path, name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return None;
    }
    let p = cwd.join("node_modules/.bin").join(name);
    p.exists().then_some(p)
}

/// Node options that take their value as the next word.
const NODE_FLAGS_WITH_VALUE: &[&str] = &[
    "-r",
    "--require",
    "--import",
    "--loader",
    "--experimental-loader",
    "--env-file",
    "--title",
    "--inspect-port",
    "--conditions",
    "-C",
];

/// Resolve `tool args` (`npm start`, `npm run serve`, `yarn dev`) run in `cwd`.
pub fn package_script(cwd: &Path, tool: &str, args: &[String]) -> Result<NodeCommand, String> {
    let (name, extra): (&str, &[String]) = match (tool, args) {
        (_, [first, rest @ ..]) if first == "start" => ("start", rest),
        (_, [run, name, rest @ ..]) if run == "run" || run == "run-script" => (name, rest),
        ("yarn" | "pnpm", [name, rest @ ..]) => (name, rest),
        _ => {
            return Err(format!(
                "`{tool} {}` is not a script to run: write `{tool} start` or `{tool} run NAME`, or script: 'server.js'",
                args.join(" ")
            ));
        }
    };
    // Arguments after `--` go to the script, as npm passes them.
    let extra: Vec<String> = extra
        .iter()
        .skip_while(|a| a.as_str() == "--")
        .cloned()
        .collect();
    let pkg_path = cwd.join("package.json");
    let pkg: Value = std::fs::read_to_string(&pkg_path)
        .map_err(|e| format!("`{tool} {name}` needs {}: {e}", pkg_path.display()))
        .and_then(|t| {
            serde_json::from_str(&t)
                .map_err(|e| format!("{}: not valid JSON: {e}", pkg_path.display()))
        })?;
    let command = match pkg
        .get("scripts")
        .and_then(|s| s.get(name))
        .and_then(Value::as_str)
    {
        Some(c) => c.to_string(),
        // npm's own default for `start`.
        None if name == "start" && cwd.join("server.js").is_file() => "node server.js".into(),
        None => {
            return Err(format!(
                "{} has no `scripts.{name}` for `{tool} {name}`",
                pkg_path.display()
            ));
        }
    };
    let mut cmd = node_command(cwd, &command).map_err(|why| {
        format!(
            "`{tool} {name}` runs `{command}`, {why}; nodeherd runs the node process itself, so write script: 'FILE' (with node_args and args) in the ecosystem file instead"
        )
    })?;
    cmd.args.extend(extra);
    Ok(cmd)
}

/// The node command in a package script's command line.
fn node_command(cwd: &Path, command: &str) -> Result<NodeCommand, String> {
    let words = split_words(command)?;
    let mut env = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        if w == "cross-env" || w == "env" {
            i += 1;
        } else if let Some((k, v)) = w.split_once('=')
            && !k.is_empty()
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            env.push((k.to_string(), v.to_string()));
            i += 1;
        } else {
            break;
        }
    }
    let Some(cmd) = words.get(i) else {
        return Err("which names no command".into());
    };
    let rest = &words[i + 1..];
    if cmd == "node" || cmd == "nodejs" {
        let mut node_args = Vec::new();
        let mut j = 0;
        while j < rest.len() && rest[j].starts_with('-') {
            let flag = rest[j].as_str();
            if matches!(flag, "-e" | "--eval" | "-p" | "--print") {
                return Err("which evaluates code given on the command line".into());
            }
            node_args.push(rest[j].clone());
            if NODE_FLAGS_WITH_VALUE.contains(&flag) && j + 1 < rest.len() {
                node_args.push(rest[j + 1].clone());
                j += 1;
            }
            j += 1;
        }
        let Some(script) = rest.get(j) else {
            return Err("which names no file for node to run".into());
        };
        return Ok(NodeCommand {
            node_args,
            script: script.clone(),
            args: rest[j + 1..].to_vec(),
            env,
        });
    }
    match bin_command(cwd, cmd) {
        Some(bin) => Ok(NodeCommand {
            node_args: Vec::new(),
            script: bin.display().to_string(),
            args: rest.to_vec(),
            env,
        }),
        None => Err(format!(
            "and `{cmd}` is neither node nor a command of the app's node_modules/.bin"
        )),
    }
}

/// Split a command line into words with sh's quoting; refuse what only a
/// shell could run (pipes, `&&`, `;`, redirections, substitutions).
fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    cur.push(q);
                }
            }
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                cur.push(n);
                            }
                        }
                        '$' | '`' => return Err("which needs a shell (a substitution)".into()),
                        _ => cur.push(q),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '|' | '&' | ';' | '<' | '>' | '`' | '$' | '(' | ')' => {
                return Err(format!("which needs a shell (`{c}`)"));
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("nodeherd-wrapper-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn app(scripts: &str) -> TempDir {
        let d = TempDir::new();
        std::fs::write(
            d.0.join("package.json"),
            format!(r#"{{"scripts": {scripts}}}"#),
        )
        .unwrap();
        d
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn npm_start_becomes_the_node_command_it_runs() {
        let d = app(
            r#"{"start": "NODE_ENV=production node --enable-source-maps -r dotenv/config dist/server.js --port 3000"}"#,
        );
        let c = package_script(&d.0, "npm", &s(&["start", "--", "--verbose"])).unwrap();
        assert_eq!(
            c.node_args,
            s(&["--enable-source-maps", "-r", "dotenv/config"])
        );
        assert_eq!(c.script, "dist/server.js");
        assert_eq!(c.args, s(&["--port", "3000", "--verbose"]));
        assert_eq!(c.env, vec![("NODE_ENV".into(), "production".into())]);
    }

    #[test]
    fn run_and_yarn_forms_and_cross_env() {
        let d = app(r#"{"serve": "cross-env PORT=1 node 'my app.js'"}"#);
        for (tool, args) in [
            ("npm", s(&["run", "serve"])),
            ("yarn", s(&["serve"])),
            ("pnpm", s(&["run-script", "serve"])),
        ] {
            let c = package_script(&d.0, tool, &args).unwrap();
            assert_eq!(c.script, "my app.js", "{tool}");
            assert_eq!(c.env, vec![("PORT".into(), "1".into())]);
        }
    }

    #[test]
    fn bin_commands_run_under_node() {
        let d = app(r#"{"start": "next start -p 3000"}"#);
        std::fs::create_dir_all(d.0.join("node_modules/.bin")).unwrap();
        std::fs::write(d.0.join("node_modules/.bin/next"), "#!/usr/bin/env node\n").unwrap();
        let c = package_script(&d.0, "npm", &s(&["start"])).unwrap();
        assert!(c.script.ends_with("node_modules/.bin/next"), "{}", c.script);
        assert_eq!(c.args, s(&["start", "-p", "3000"]));
    }

    #[test]
    fn what_needs_a_shell_is_refused_with_what_to_write() {
        for script in [
            r#"{"start": "npm run build && node server.js"}"#,
            r#"{"start": "node server.js | pino-pretty"}"#,
            r#"{"start": "python3 app.py"}"#,
            r#"{"start": "node -e 'require(1)'"}"#,
            r#"{"start": "node --port=$PORT server.js"}"#,
        ] {
            let d = app(script);
            let e = package_script(&d.0, "npm", &s(&["start"])).unwrap_err();
            assert!(e.contains("write script: 'FILE'"), "{script}: {e}");
        }
        let d = app("{}");
        let e = package_script(&d.0, "npm", &s(&["start"])).unwrap_err();
        assert!(e.contains("no `scripts.start`"), "{e}");
        assert!(package_script(&d.0, "npm", &s(&["install"])).is_err());
    }
}
