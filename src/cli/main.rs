//! The `dlb` CLI: `dlb up`/`dlb down` run the whole mesh, `dlb call` runs one operation,
//! `dlb bench` measures throughput and latency.
//!
//! Its modules are the binary's own: no service links them (services use the `dlb` library
//! only), so changing one rebuilds this binary alone.

mod certs;
mod process;
mod report;
mod suite;
mod up;

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dlb::client::bench::{self, BenchConfig, Progress};
use dlb::client::{self, Op};
use dlb::proto::v1::operations_client::OperationsClient;

/// The gateway's default address: where users send work.
const DEFAULT_ADDR: &str = "127.0.0.1:12000";

#[derive(Debug, Parser)]
#[command(
    name = "dlb",
    version,
    about = "dlb: a distributed load balancer for gRPC compute"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the whole mesh (Redis, control with compute instances, gateway, dashboard) and
    /// stop it all on Ctrl-C.
    Up(up::UpArgs),
    /// Stop a mesh started with `dlb up --detach`.
    Down(up::DownArgs),
    /// Run one operation and print its result, the instance that served it and the latency.
    Call(CallArgs),
    /// Measure throughput and latency against one or more addresses.
    Bench(BenchArgs),
    /// The benchmark suite: direct, dlb-gateway, NGINX and HAProxy in one run, with a report.
    BenchSuite(suite::SuiteArgs),
    /// Ask a service's grpc.health.v1 Check; exit 0 only when it answers SERVING (for
    /// container health checks and scripts).
    Health(HealthArgs),
    /// Certificates for mutual TLS (`dlb certs init DIR`).
    Certs(certs::CertsArgs),
}

#[derive(Debug, Args)]
struct HealthArgs {
    /// Address of any dlb service (host:port or http://host:port).
    #[arg(long, env = "DLB_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// The service to ask about ("" is the whole server, e.g. dlb.v1.Operations for one).
    #[arg(long, default_value = "")]
    service: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 2.0, allow_negative_numbers = true)]
    timeout: f64,
    /// TLS towards --addr.
    #[command(flatten)]
    tls: dlb::tls::TlsArgs,
}

#[derive(Debug, Args)]
struct CallArgs {
    /// Address of a gateway or compute instance (host:port or http://host:port).
    #[arg(long, env = "DLB_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Deadline for the call, in seconds.
    #[arg(long, default_value_t = 30.0, allow_negative_numbers = true)]
    timeout: f64,
    /// TLS towards --addr.
    #[command(flatten)]
    tls: dlb::tls::TlsArgs,
    /// Start a trace and export its span (see docs/tracing.md).
    #[command(flatten)]
    trace: dlb::trace::TraceArgs,
    #[command(subcommand)]
    op: OpCommand,
}

#[derive(Debug, Subcommand)]
enum OpCommand {
    /// Is NUMBER prime? (decimal digits only)
    Prime {
        /// The number.
        number: String,
    },
    /// Is TEXT a palindrome? ("-" reads standard input)
    Palindrome {
        /// The text.
        text: String,
        /// Ignore case, whitespace and punctuation.
        #[arg(long)]
        normalize: bool,
    },
    /// TEXT reversed by grapheme clusters. ("-" reads standard input)
    Reverse {
        /// The text.
        text: String,
    },
    /// The N-th Fibonacci number, F(0) = 0.
    #[command(alias = "fibonacci")]
    Fib {
        /// Which one.
        n: u64,
    },
    /// Words, lines, characters and bytes of TEXT. ("-" reads standard input)
    #[command(alias = "word-count")]
    Wc {
        /// The text.
        text: String,
        /// Also list the N most frequent words.
        #[arg(long, default_value_t = 0)]
        top: u32,
    },
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Addresses to spread load over (repeat the flag or separate with commas).
    #[arg(long, env = "DLB_ADDR", default_value = DEFAULT_ADDR, value_delimiter = ',')]
    addr: Vec<String>,
    /// Operation: prime, palindrome, reverse, fib or wc.
    #[arg(long, default_value = "reverse")]
    op: String,
    /// Input for the operation (a number for prime and fib, text otherwise).
    #[arg(long, default_value = "hello")]
    input: String,
    /// Closed loop: requests in flight at once.
    #[arg(short, long, default_value_t = bench::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Open loop: start requests at this fixed rate per second instead (latency counted from
    /// each request's intended start).
    #[arg(long, allow_negative_numbers = true)]
    rate: Option<f64>,
    /// HTTP/2 connections per address.
    #[arg(long, default_value_t = bench::DEFAULT_CONNECTIONS)]
    connections: usize,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    warmup: f64,
    /// Measured seconds.
    #[arg(short, long, default_value_t = 10.0, allow_negative_numbers = true)]
    duration: f64,
    /// Stop after this many measured requests instead of after --duration.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Per-request deadline in seconds.
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    timeout: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress line on standard error.
    #[arg(long, short)]
    quiet: bool,
    /// TLS towards the addresses.
    #[command(flatten)]
    tls: dlb::tls::TlsArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dlb: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => Ok(up::up(args).await),
            Command::Down(args) => Ok(up::down(args).await),
            Command::Call(args) => run_call(args).await,
            Command::Bench(args) => run_bench(args).await,
            Command::BenchSuite(args) => Ok(suite::suite(args).await),
            Command::Health(args) => run_health(args).await,
            Command::Certs(args) => certs::run(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("dlb: {message}");
            ExitCode::from(2)
        }
    }
}

fn client_tls(args: &dlb::tls::TlsArgs) -> Result<Option<dlb::tls::ClientTls>, String> {
    let tls = args.load()?;
    match &tls {
        Some(tls) if tls.client().is_none() => Err(
            "--tls-cert/--tls-key without --tls-ca: give the CA to verify the server with"
                .to_owned(),
        ),
        _ => Ok(tls.and_then(|tls| tls.client())),
    }
}

async fn run_health(args: HealthArgs) -> Result<ExitCode, String> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let timeout = positive_seconds("timeout", args.timeout)?;
    let tls = client_tls(&args.tls)?;
    let channel = dlb::dial::endpoint_tls(&args.addr, tls.as_ref())
        .map_err(|e| e.to_string())?
        .connect_lazy();
    let request = HealthCheckRequest {
        service: args.service.clone(),
    };
    let answer = tokio::time::timeout(timeout, HealthClient::new(channel).check(request)).await;
    let tls = tls.as_ref();
    let (line, ok) = match answer {
        Err(_) => (
            format!("{}: no answer within {timeout:?}", args.addr),
            false,
        ),
        Ok(Err(status)) => {
            let message = dlb::client::status_message(&status);
            let hint = dlb::tls::hint(&message, tls)
                .filter(|_| std::error::Error::source(&status).is_some())
                .map(|h| format!("\nhint: {h}"))
                .unwrap_or_default();
            (format!("{}: {message}{hint}", args.addr), false)
        }
        Ok(Ok(reply)) => {
            let status = reply.into_inner().status();
            (
                format!("{}: {}", args.addr, status.as_str_name()),
                status == tonic_health::pb::health_check_response::ServingStatus::Serving,
            )
        }
    };
    if ok {
        println!("{line}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{line}");
        Ok(ExitCode::FAILURE)
    }
}

fn seconds(flag: &str, value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| format!("--{flag} must be a non-negative number of seconds, got {value}"))
}

/// A deadline or a run's length: zero would end it before it starts.
fn positive_seconds(flag: &str, value: f64) -> Result<Duration, String> {
    match Duration::try_from_secs_f64(value) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(format!(
            "--{flag} must be a positive number of seconds, got {value}"
        )),
    }
}

fn text_arg(text: String) -> Result<String, String> {
    if text != "-" {
        return Ok(text);
    }
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("cannot read standard input as UTF-8 text: {e}"))?;
    Ok(input)
}

async fn run_call(args: CallArgs) -> Result<ExitCode, String> {
    let op = match args.op {
        OpCommand::Prime { number } => Op::Prime { number },
        OpCommand::Palindrome { text, normalize } => Op::Palindrome {
            text: text_arg(text)?,
            normalize,
        },
        OpCommand::Reverse { text } => Op::Reverse {
            text: text_arg(text)?,
        },
        OpCommand::Fib { n } => Op::Fibonacci { n },
        OpCommand::Wc { text, top } => Op::WordCount {
            text: text_arg(text)?,
            top,
        },
    };
    let timeout = positive_seconds("timeout", args.timeout)?;
    let tls = client_tls(&args.tls)?;
    let channel = dlb::dial::endpoint_tls(&args.addr, tls.as_ref())
        .map_err(|e| e.to_string())?
        .connect_lazy();
    let mut client =
        OperationsClient::new(channel).max_decoding_message_size(dlb::dial::MAX_RESPONSE_BYTES);
    let (tracer, exporting) = dlb::trace::Exporting::from_args(&args.trace, "dlb", "dlb-call")?;
    let outcome = client::call_traced(&mut client, &op, Some(timeout), &tracer).await;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&outcome).map_err(|e| e.to_string())?
        );
    } else if let Some(error) = &outcome.error {
        eprintln!("{}", outcome.human(&op));
        // Only this client's own connection says anything about its TLS settings.
        if let Some(hint) = dlb::tls::hint(&error.message, tls.as_ref()).filter(|_| error.local) {
            eprintln!("hint: {hint}");
        }
    } else {
        println!("{}", outcome.human(&op));
    }
    if let Some(exporting) = exporting {
        let (_, lost) = exporting.finish().await;
        if lost > 0 {
            eprintln!(
                "warning: the call's trace was not exported ({lost} span(s) lost): is a collector \
                 listening at the OTLP endpoint?"
            );
        }
    }
    Ok(if outcome.error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn run_bench(args: BenchArgs) -> Result<ExitCode, String> {
    let config = BenchConfig {
        addrs: args
            .addr
            .iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect(),
        op: Op::parse(&args.op, &args.input)?,
        concurrency: args.concurrency,
        rate: args.rate,
        connections: args.connections,
        warmup: seconds("warmup", args.warmup)?,
        // Unused when --requests bounds the run instead.
        duration: if args.requests.is_some() {
            seconds("duration", args.duration)?
        } else {
            positive_seconds("duration", args.duration)?
        },
        requests: args.requests,
        timeout: positive_seconds("timeout", args.timeout)?,
        tls: client_tls(&args.tls)?,
    };
    let progress = Arc::new(Progress::default());
    let ticker = (!args.quiet).then(|| {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            let mut last = 0;
            let mut elapsed = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let done = progress.completed.load(Ordering::Relaxed);
                let errors = progress.errors.load(Ordering::Relaxed);
                if progress.warming_up.load(Ordering::Relaxed) {
                    eprint!("\rwarming up...                                           ");
                    continue;
                }
                elapsed += 1;
                eprint!(
                    "\r{elapsed:>4} s  {done:>10} requests  {:>9} req/s  {errors} errors   ",
                    done - last
                );
                last = done;
            }
        })
    });
    let report = bench::run(config, progress).await;
    if let Some(ticker) = ticker {
        ticker.abort();
        eprint!("\r{:70}\r", "");
    }
    let report = report.map_err(|e| e.to_string())?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", report::human(&report));
    }
    // A run where nothing succeeded measured nothing: say so in the exit status too.
    Ok(if report.requests > 0 && report.ok == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
