//! What `completion` and `man` print: generated from the clap definitions,
//! answered without a cluster.

use std::process::ExitCode;

use clap::CommandFactory;

use super::args::{Action, Cli};

/// Completions and the man page; `None` for every other action.
pub fn print(action: &Action) -> Option<ExitCode> {
    // Generated into memory first: a closed pipe (`| head`) must not panic.
    let generated = match action {
        Action::Completion { shell } => super::complete::script(*shell),
        Action::Man { dir: Some(dir) } => {
            return Some(match write_man_pages(dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!(
                        "deploylock: cannot write the man pages into {}: {err}",
                        dir.display()
                    );
                    ExitCode::FAILURE
                }
            });
        }
        Action::Man { dir: None } => {
            let mut buffer = Vec::new();
            // As `man --dir` writes it: no page for `help` to name.
            clap_mangen::Man::new(Cli::command().disable_help_subcommand(true))
                .render(&mut buffer)
                .map(|()| buffer)
        }
        _ => return None,
    };
    use std::io::Write;
    let written = generated.and_then(|buffer| std::io::stdout().write_all(&buffer));
    Some(match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("deploylock: cannot write the output: {err}");
            ExitCode::FAILURE
        }
    })
}

/// deploylock.1 and one page per action (deploylock-acquire.1, …: the
/// pages the main page's SEE ALSO names), each with its options.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
}
