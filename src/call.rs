//! `idemproxy call` (SPEC §8): curl for the callers that retry most —
//! agents, CI jobs, shell scripts. The proxy makes the server side safe; this
//! makes the client side right: every attempt of one operation carries the
//! same key, an original still in flight is waited for rather than failed,
//! and the report says whether the call executed now (`created`) or had
//! already executed (`replayed`).
//!
//! - [`request`] turns the command line into the one request every attempt sends;
//! - [`key`] chooses its idempotency key (explicit, derived, random);
//! - [`retry`] decides what is worth another attempt and how long to pause;
//! - [`transport`] performs one exchange (hyper, rustls);
//! - [`outcome`] names the effect, the exit status and the JSON report;
//! - [`dry_run`] asks the proxy's status endpoint instead of calling.
//!
//! Nothing but `--dry-run` depends on idemproxy: the rest follows the IETF
//! draft and Stripe's conventions, so it works against any such API.

pub mod dry_run;
pub mod key;
pub mod outcome;
pub mod request;
pub mod retry;
pub mod transport;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::cli::{CallArgs, OutputFormat};
use outcome::{problem_code, Effect, Exit, Report};
use request::{Plan, PlanError};
use retry::{Backoff, Verdict};
use transport::{Reply, SendError, TlsError, Transport};

/// A call that could not start; nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Runs `idemproxy call` and prints its report: the whole command.
/// A small current-thread runtime of its own: one call needs no more.
pub fn main(args: CallArgs) -> ExitCode {
    let format = args.output.unwrap_or(if std::io::stdout().is_terminal() {
        OutputFormat::Raw
    } else {
        OutputFormat::Json
    });
    // The blocking parts (reading -d @FILE or stdin, the system's
    // certificates) happen here, before the runtime starts.
    let report = Plan::from_args(&args, std::io::stdin().lock())
        .map_err(CallError::from)
        .and_then(|plan| Ok((plan, Transport::new(args.cacert.as_deref(), args.timeout)?)))
        .and_then(|(plan, transport)| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(CallError::Runtime)?;
            Ok(rt.block_on(run(&args, &plan, &transport)))
        });
    match report {
        Ok(report) => {
            print(&report, format);
            ExitCode::from(report.exit as u8)
        }
        Err(e) => {
            eprintln!("idemproxy call: {e}");
            ExitCode::from(Exit::Refused as u8)
        }
    }
}

fn print(report: &Report, format: OutputFormat) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head`) is the reader's choice, not our failure.
    let _ = match format {
        OutputFormat::Json => writeln!(out, "{}", report.to_json()),
        OutputFormat::Raw => {
            eprintln!("{}", report.summary());
            match &report.reply {
                Some(r) => out.write_all(&r.body),
                None => Ok(()),
            }
        }
    };
    let _ = out.flush();
}

/// Performs the call (or the dry run) with its retries.
pub async fn run(args: &CallArgs, plan: &Plan, transport: &Transport) -> Report {
    let key = plan.key().map(str::to_owned);
    let attempts = Attempts {
        transport,
        retries: args.retries,
        wait: args.wait,
        key: key.as_deref(),
    };
    if !args.dry_run {
        return attempts.until_final(|| plan.request()).await.report(key);
    }
    dry_run::run(&attempts, plan, &args.status_path, args.wait).await
}

/// The retry loop of one call: its settings, the same for every attempt.
struct Attempts<'a> {
    transport: &'a Transport,
    retries: u32,
    wait: bool,
    /// Only for the notes on stderr.
    key: Option<&'a str>,
}

/// How the retry loop ended.
enum How {
    /// The server's final answer.
    Final(Reply),
    /// A failure that another attempt would repeat (TLS); nothing was sent.
    Hopeless(SendError),
    /// Retries ran out; the last response or error, and whether the
    /// original was still in flight.
    Exhausted(Result<Reply, SendError>, bool),
}

struct Ended {
    how: How,
    attempts: u32,
}

impl Ended {
    fn report(self, key: Option<String>) -> Report {
        let attempts = self.attempts;
        match self.how {
            How::Final(reply) => Report::answered(reply, key, attempts),
            How::Hopeless(e) => Report {
                effect: Effect::Failed,
                exit: Exit::Failed,
                key,
                attempts,
                reply: None,
                note: Some(e.to_string()),
            },
            How::Exhausted(last, in_use) => {
                let effect = if in_use { Effect::InProgress } else { Effect::Failed };
                let (reply, note) = match last {
                    Ok(reply) => (Some(reply), None),
                    Err(e) => (None, Some(exhausted_note(&e, attempts))),
                };
                Report {
                    effect,
                    exit: Exit::Exhausted,
                    key,
                    attempts,
                    reply,
                    note,
                }
            }
        }
    }
}

fn exhausted_note(e: &SendError, attempts: u32) -> String {
    let maybe = if e.maybe_sent() {
        "; the request may have executed: run the same command with the same key to find out"
    } else {
        ""
    };
    format!("no answer after {attempts} attempts, the last: {e}{maybe}")
}

impl Attempts<'_> {
    /// Sends `request()` until a final answer, a retry budget spent, or (with
    /// `--wait`) the in-flight original's result. Waiting for an original
    /// costs no retries: it is progress, not trouble.
    async fn until_final(&self, request: impl Fn() -> Request<Full<Bytes>>) -> Ended {
        let backoff = Backoff::default();
        let (mut sent, mut retried) = (0u32, 0u32);
        loop {
            sent += 1;
            let result = self.transport.send(request()).await;
            let (after, in_use, why) = match &result {
                Ok(reply) => {
                    let after = retry::retry_after(&reply.headers, SystemTime::now());
                    let code = problem_code(reply);
                    match retry::verdict(reply.status, code.as_deref(), after.is_some()) {
                        Verdict::Final => {
                            return Ended {
                                how: How::Final(result.expect("matched Ok")),
                                attempts: sent,
                            }
                        }
                        Verdict::InUse if self.wait => {
                            let pause = after.unwrap_or_else(|| backoff.delay(2, &mut rand::thread_rng()));
                            self.note(sent, "the original is still in flight", "waiting", pause);
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        verdict => (after, verdict == Verdict::InUse, reply.status.to_string()),
                    }
                }
                Err(e) if !e.retryable() => {
                    return Ended {
                        how: How::Hopeless(result.expect_err("matched Err")),
                        attempts: sent,
                    }
                }
                Err(e) => (None, false, e.to_string()),
            };
            let too_late = after.is_some_and(|a| a > retry::MAX_RETRY_AFTER);
            if retried >= self.retries || too_late {
                if too_late {
                    eprintln!("idemproxy call: the server asked to retry after more than 60s; not waiting that long");
                }
                return Ended {
                    how: How::Exhausted(result, in_use),
                    attempts: sent,
                };
            }
            retried += 1;
            let pause = backoff
                .delay(retried, &mut rand::thread_rng())
                .max(after.unwrap_or_default());
            self.note(sent, &why, "retrying", pause);
            tokio::time::sleep(pause).await;
        }
    }

    fn note(&self, attempt: u32, why: &str, what: &str, pause: Duration) {
        let key = self.key.map_or_else(String::new, |k| format!(" with the same key {k}"));
        eprintln!(
            "idemproxy call: attempt {attempt}: {why}; {what} {:.1}s{key}",
            pause.as_secs_f64()
        );
    }
}
