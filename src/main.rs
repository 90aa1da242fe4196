use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use nodeherd::cli::{Cli, Command};

fn main() -> ExitCode {
    // PM2's commands that nodeherd has no need of: a pointer to what does
    // the same here, before clap suggests a look-alike that does not.
    if let Some(verb) = std::env::args().nth(1)
        && let Some(hint) = nodeherd::pm2::hint(&verb)
    {
        eprintln!("nodeherd: `{verb}` is PM2's; {hint}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => nodeherd::run::main(*args),
        Command::Start(args) => nodeherd::pm2::start(*args),
        Command::Stop(args) => nodeherd::pm2::stop(args),
        Command::Delete(args) => nodeherd::pm2::delete(args),
        Command::Ls(args) => nodeherd::ls::ls(args),
        Command::Logs(args) => nodeherd::tail::logs(args),
        Command::Status(args) => nodeherd::client::status(args),
        Command::Reload(args) => nodeherd::client::reload(args),
        Command::History(args) => nodeherd::client::history(args),
        Command::Rollback(args) => nodeherd::client::rollback(args),
        Command::Restart(args) => nodeherd::client::restart(args),
        Command::Scale(args) => nodeherd::client::scale(args),
        Command::Reexec(args) => nodeherd::client::reexec(args),
        Command::Drain(args) => nodeherd::client::drain(args),
        Command::Undrain(args) => nodeherd::client::undrain(args),
        Command::Diagnose(args) => nodeherd::client::diagnose(args),
        Command::CheckState => nodeherd::supervisor::takeover::check_main(),
        Command::Monit(args) => nodeherd::monit::monit(args),
        Command::Install(args) => nodeherd::install::install(args),
        Command::Uninstall(args) => nodeherd::install::uninstall(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "nodeherd",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man => match nodeherd::manpage::render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nodeherd: cannot write the man page: {e}");
                ExitCode::from(1)
            }
        },
    }
}
