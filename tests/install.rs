//! `nodeherd install` outside systemd: what it would write, and what it
//! refuses (issue 12). The real install, with systemctl, is in
//! tests/systemd/e2e.sh under a booted systemd.

mod common;

use common::*;

fn install(args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["install"];
    a.extend_from_slice(args);
    client(&a)
}

#[test]
fn a_dry_run_shows_the_config_copy_the_socket_dropin_and_the_commands() {
    let dir = tempdir::Dir::new("install");
    std::fs::create_dir_all(dir.path.join("srv")).unwrap();
    std::fs::copy(app("env.js"), dir.path.join("srv/app.js")).unwrap();
    let eco = dir.write(
        "ecosystem.json",
        r#"{"apps":[{"name":"shop","script":"app.js","cwd":"srv","env":{"A":"1"}}]}"#,
    );
    let etc = dir.path.join("etc");
    let units = dir.path.join("units");
    let (code, out, err) = install(&[
        &path_str(&eco),
        "--config-dir",
        &path_str(&etc),
        "--unit-dir",
        &path_str(&units),
        "--listen",
        "127.0.0.1:8123",
        "--listen",
        "unix:/run/shop.sock",
        "--boot",
        "--now",
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{err}");
    let copy = format!("--- would write {}", etc.join("shop.json").display());
    assert!(out.contains(&copy), "{out}");
    // The copy lives elsewhere: cwd must be absolute and the origin kept.
    let srv = dir.path.join("srv").display().to_string();
    assert!(out.contains(&format!("\"cwd\": \"{srv}\"")), "{out}");
    assert!(
        out.contains(&format!("\"installed_from\": \"{}\"", eco.display())),
        "{out}"
    );
    assert!(
        out.contains(
            "[Socket]\nListenStream=\nListenStream=127.0.0.1:8123\nListenStream=/run/shop.sock\n"
        ),
        "{out}"
    );
    for cmd in [
        "systemctl daemon-reload",
        "systemctl enable nodeherd@shop.service",
        "systemctl start nodeherd@shop.socket",
        "systemctl start nodeherd@shop.service",
    ] {
        assert!(
            out.contains(&format!("--- would run: {cmd}")),
            "{cmd}: {out}"
        );
    }
    assert!(!etc.exists(), "a dry run writes nothing");
}

#[test]
fn it_refuses_invalid_files_and_names_and_files_it_did_not_write_and_keeps_similar_names_apart() {
    let dir = tempdir::Dir::new("refuse");
    let script = path_str(&app("env.js"));
    let etc = dir.path.join("etc");
    let run = |file: &std::path::Path| {
        install(&[
            &path_str(file),
            "--config-dir",
            &path_str(&etc),
            "--unit-dir",
            &path_str(&dir.path),
            "--dry-run",
        ])
    };
    let bad = dir.write(
        "bad.json",
        &format!(r#"{{"apps":[{{"name":"a","script":"{script}","instances":"lots"}}]}}"#),
    );
    let (code, _, err) = run(&bad);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("key `instances`"), "{err}");

    // Names that used to meet on one bus name get one each now, with a
    // policy file and a user each.
    let pair = dir.write(
        "pair.json",
        &format!(
            r#"{{"apps":[{{"name":"my-app","script":"{script}"}},{{"name":"my_app","script":"{script}"}}]}}"#
        ),
    );
    let (code, out, err) = run(&pair);
    assert_eq!(code, 0, "{err}");
    for (file, own) in [
        (
            "org.nodeherd.my-app.conf",
            "<allow own=\"org.nodeherd.my-app\"/>",
        ),
        (
            "org.nodeherd.my_5fapp.conf",
            "<allow own=\"org.nodeherd.my_5fapp\"/>",
        ),
    ] {
        assert!(
            out.contains(&format!("--- would write /etc/dbus-1/system.d/{file}")),
            "{file}: {out}"
        );
        assert!(out.contains(own), "{own}: {out}");
    }
    for user in ["nodeherd-my-app", "nodeherd-my_app"] {
        assert!(out.contains(&format!("\nu {user} - ")), "{user}: {out}");
        assert!(
            out.contains(&format!(
                "--- would run: systemd-sysusers /etc/sysusers.d/{user}.conf"
            )),
            "{user}: {out}"
        );
    }

    // A dot is fine in a unit name, not in a user name.
    let dotted = dir.write(
        "dotted.json",
        &format!(r#"{{"apps":[{{"name":"my.app","script":"{script}"}}]}}"#),
    );
    let (code, _, err) = run(&dotted);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot be part of a user name (nodeherd-my.app"),
        "{err}"
    );

    let spaced = dir.write(
        "spaced.json",
        &format!(r#"{{"apps":[{{"name":"my app","script":"{script}"}}]}}"#),
    );
    let (code, _, err) = run(&spaced);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("systemd instance name"), "{err}");

    let good = dir.write(
        "good.json",
        &format!(r#"{{"apps":[{{"name":"web","script":"{script}"}}]}}"#),
    );
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("web.config.js"), "module.exports = {}").unwrap();
    let (code, _, err) = run(&good);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("was not written by `nodeherd install`"),
        "{err}"
    );

    let (code, _, err) = client(&[
        "uninstall",
        "web",
        "--config-dir",
        &path_str(&etc),
        "--dry-run",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nothing removed"), "{err}");
}
