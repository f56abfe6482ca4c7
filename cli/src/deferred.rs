//! Subcommands whose arguments clap builds only when the command line enters
//! them. clap's derive builds the whole command tree before parsing: every
//! subcommand of every group, with all its arguments, help texts and value
//! parsers. For a client command that is most of its start after `execve`
//! (the heap's pages, each a fault). `Command::defer` delays a part until
//! clap enters it; `Deferred` is that, for a derived group or set of arguments.
//!
//! A command with an argument of the same name as a global one (`--endpoint`)
//! is not deferred: clap adds the global arguments to a command before its
//! deferred part runs, and the two would clash (the test
//! `the_command_line_is_well_formed` says so).

use clap::{ArgMatches, Args, Command, Error, FromArgMatches, Subcommand};

/// `T`, built by clap only when entered.
#[derive(Clone, Debug)]
pub struct Deferred<T>(pub T);

impl<T: FromArgMatches> FromArgMatches for Deferred<T> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, Error> {
        T::from_arg_matches(matches).map(Deferred)
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, Error> {
        T::from_arg_matches_mut(matches).map(Deferred)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), Error> {
        self.0.update_from_arg_matches(matches)
    }

    fn update_from_arg_matches_mut(&mut self, matches: &mut ArgMatches) -> Result<(), Error> {
        self.0.update_from_arg_matches_mut(matches)
    }
}

impl<T: Subcommand> Subcommand for Deferred<T> {
    fn augment_subcommands(cmd: Command) -> Command {
        cmd.defer(T::augment_subcommands)
    }

    fn augment_subcommands_for_update(cmd: Command) -> Command {
        cmd.defer(T::augment_subcommands_for_update)
    }

    fn has_subcommand(name: &str) -> bool {
        T::has_subcommand(name)
    }
}

impl<T: Args> Args for Deferred<T> {
    fn augment_args(cmd: Command) -> Command {
        cmd.defer(T::augment_args)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        cmd.defer(T::augment_args_for_update)
    }

    fn group_id() -> Option<clap::Id> {
        T::group_id()
    }
}
