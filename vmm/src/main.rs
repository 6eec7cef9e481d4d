//! `evm`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use vmm::config;
use vmm::epoch::{MAX_INTERVAL, MIN_INTERVAL};
use vmm::persist::Flags;
use vmm::vm::{self, RunEnd, RunOptions};

#[derive(Parser, Debug)]
#[command(
    name = "evm",
    version,
    about = "A KVM virtual machine monitor that makes whole Linux VMs transparently persistent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest, or resume it from its store, with its serial console
    /// on stdin/stdout.
    ///
    /// With a store (--store, or the default store), evm takes an epoch
    /// every --interval and resumes from the last committed one on the next
    /// run. The console escape is Ctrl-A x (Ctrl-A Ctrl-A sends a Ctrl-A);
    /// it, SIGTERM and SIGINT commit a final epoch and exit 0. Guest
    /// poweroff/reboot exit 0 and the next run boots again.
    Run(RunArgs),
    /// Write the guest's disk and/or memory as of a committed epoch.
    ///
    /// Reads the store without locking it, so it works while its VM runs.
    Export(ExportArgs),
    /// List the retained epochs of a store (works while its VM runs).
    Epochs(EpochsArgs),
    /// What a store holds as of an epoch: config, vCPU registers, devices,
    /// memory and disk; or one guest page as a hex dump (--page).
    Inspect(InspectArgs),
    /// Check every superblock, record and CRC of a store; exit 1 naming the
    /// first bad one.
    Verify(VerifyArgs),
    /// Pages and disk blocks written between two epochs of a store.
    Diff(DiffArgs),
    /// Make a new store whose state is an older epoch of a store.
    ///
    /// `evm run --store NEW` then resumes that epoch; the source store is
    /// only read.
    Fork(ForkArgs),
    /// Status of a running VM (through its control API socket).
    Status(ApiArgs),
    /// Take an epoch of a running VM now; prints its number once committed.
    Checkpoint(ApiArgs),
    /// Pause a running VM's vCPUs.
    Pause(ApiArgs),
    /// Let a paused VM run again.
    Resume(ApiArgs),
    /// Stop a running VM: commit a final epoch, then evm exits.
    Stop(ApiArgs),
    /// A live terminal view of a running VM (q quits).
    Top(TopArgs),
}

#[derive(clap::Args, Debug)]
struct ApiArgs {
    /// The VM's control socket (`evm run --api-sock PATH`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct TopArgs {
    /// The VM's control socket (`evm run --api-sock PATH`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// How often to refresh, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60000))]
    refresh_ms: u64,
}

#[derive(clap::Args, Debug)]
struct EpochsArgs {
    /// The store.
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
    /// One JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct InspectArgs {
    /// The store.
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
    /// The epoch [default: the newest committed one].
    #[arg(long, value_name = "N")]
    epoch: Option<u64>,
    /// Hex-dump the guest page at this guest-physical address (0x… or
    /// decimal; a multiple of 4096).
    #[arg(long, value_name = "GPA", value_parser = parse_gpa)]
    page: Option<u64>,
}

fn parse_gpa(s: &str) -> Result<u64, String> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|_| format!("{s:?} is not an address (use 0x1000 or 4096)"))
}

#[derive(clap::Args, Debug)]
struct VerifyArgs {
    /// The store.
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
}

#[derive(clap::Args, Debug)]
struct DiffArgs {
    /// The store.
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
    /// The older epoch.
    #[arg(value_name = "A")]
    a: u64,
    /// The newer epoch.
    #[arg(value_name = "B")]
    b: u64,
}

#[derive(clap::Args, Debug)]
struct ForkArgs {
    /// The store to fork from.
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
    /// The epoch the new store starts from.
    #[arg(long, value_name = "N")]
    epoch: u64,
    /// The new store (must not exist).
    #[arg(value_name = "NEW")]
    new: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    /// The store.
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
    /// Where to write the disk (a new file; an existing one is refused).
    #[arg(long, value_name = "OUT.img", required_unless_present = "memory")]
    disk: Option<PathBuf>,
    /// Where to write the guest memory image (a new file): RAM as one flat
    /// image, the RAM above the 3 GiB MMIO gap following the RAM below it.
    #[arg(long, value_name = "OUT.raw")]
    memory: Option<PathBuf>,
    /// The epoch [default: the newest committed one].
    #[arg(long, value_name = "N")]
    epoch: Option<u64>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Linux bzImage, or evm's probe guest image (needed to create a store
    /// or to run without one).
    #[arg(long, value_name = "BZIMAGE")]
    kernel: Option<PathBuf>,
    /// Initramfs to load with the kernel.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default (for Linux:
    /// "console=ttyS0 pci=off panic=-1 quiet"; for the probe guest: empty).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory (K, M, G, T suffixes) [default: 512M].
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// Number of vCPUs, 1 to 8 [default: 2].
    #[arg(long, value_name = "N")]
    vcpus: Option<u64>,
    /// Raw disk image, exposed as virtio-blk (/dev/vda). With a store it
    /// is imported into the new store, whose disk is part of every epoch;
    /// with --no-store it is used in place.
    #[arg(long, value_name = "IMG")]
    disk: Option<PathBuf>,
    /// Size of a new, empty disk kept in the new store (K, M, G, T; a
    /// multiple of 4 KiB).
    #[arg(long, value_name = "SIZE", conflicts_with = "disk")]
    disk_size: Option<String>,
    /// The store: a file or block device that holds the VM. Created if
    /// absent (or all zeros); resumed from if it holds a committed epoch.
    /// Default: $EVM_STORE, else ~/.local/share/evm/default.store.
    #[arg(long, value_name = "PATH", conflicts_with = "no_store")]
    store: Option<PathBuf>,
    /// Run without a store: nothing is saved.
    #[arg(long)]
    no_store: bool,
    /// Time between epochs, 10ms to 10min (e.g. 500ms, 1s, 2m).
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    interval: String,
    /// Discard the saved machine state and boot again (the disk is kept).
    #[arg(long)]
    fresh: bool,
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket; see
    /// `evm status|checkpoint|pause|resume|stop|top`.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
}

/// Parse `10ms`, `1s`, `2m`, `1.5s`.
fn parse_interval(s: &str) -> anyhow::Result<Duration> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--interval {s}: not a duration (use e.g. 500ms, 1s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        _ => anyhow::bail!("--interval {s}: unknown unit {unit:?} (use ms, s or m)"),
    };
    if !secs.is_finite() || secs < 0.0 {
        anyhow::bail!("--interval {s}: not a duration");
    }
    let d = Duration::from_secs_f64(secs);
    if d < MIN_INTERVAL || d > MAX_INTERVAL {
        anyhow::bail!("--interval {s}: must be between 10ms and 10min");
    }
    Ok(d)
}

fn default_store() -> PathBuf {
    if let Some(p) = std::env::var_os("EVM_STORE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".local/share/evm/default.store")
}

fn run(args: RunArgs) -> anyhow::Result<RunEnd> {
    let mem = match &args.mem {
        Some(m) => {
            let bytes = config::parse_size(m)?;
            Some((m.clone(), config::check_mem(m, bytes, config::host_ram())?))
        }
        None => None,
    };
    let vcpus = args.vcpus.map(config::check_vcpus).transpose()?;
    let disk_size = match &args.disk_size {
        Some(d) => Some((
            d.clone(),
            config::parse_size(d).map_err(|e| anyhow::anyhow!("--disk-size: {e}"))?,
        )),
        None => None,
    };
    let interval = parse_interval(&args.interval)?;
    let store = if args.no_store {
        None
    } else {
        Some(args.store.unwrap_or_else(default_store))
    };
    let opts = RunOptions {
        flags: Flags {
            kernel: args.kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
            mem,
            vcpus,
            disk: args.disk,
            disk_size,
        },
        store,
        interval,
        fresh: args.fresh,
        api_sock: args.api_sock,
    };
    Ok(vm::run(&opts)?)
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    if let Some(out) = &args.disk {
        vmm::export::disk(&args.store, out, args.epoch)?;
    }
    if let Some(out) = &args.memory {
        vmm::tools::export_memory(&args.store, out, args.epoch)?;
    }
    Ok(())
}

/// `evm status|checkpoint|pause|resume|stop`: one request, its answer.
fn api_command(args: &ApiArgs, method: &str, path: &str) -> anyhow::Result<()> {
    use vmm::api::client;
    let timeout = if method == "GET" {
        client::QUICK
    } else {
        client::SLOW
    };
    let v = client::json(&args.api_sock, method, path, None, timeout)?;
    let text = if args.json {
        format!("{v}\n")
    } else {
        match path {
            "/status" => client::status_text(&v),
            "/checkpoint" => format!("epoch {} committed\n", v["epoch"]),
            "/stop" => match v["final_epoch"].as_u64() {
                Some(n) => format!("stopped; final epoch {n} committed\n"),
                None => "stopped (no store)\n".to_string(),
            },
            _ => format!(
                "{}{}\n",
                v["state"].as_str().unwrap_or("?"),
                if v["changed"] == false {
                    " (already)"
                } else {
                    ""
                }
            ),
        }
    };
    use std::io::Write;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

fn main() -> ExitCode {
    vmm::logger::init();
    if let Err(e) = vmm::signals::block_stop_signals() {
        eprintln!("evm: cannot block stop signals: {e}");
        return ExitCode::FAILURE;
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like every other evm error.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("evm: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Export(args) => export(args).map(|()| RunEnd::Stopped),
        Command::Epochs(args) => vmm::tools::epochs(&args.store, args.json)
            .map(|()| RunEnd::Stopped)
            .map_err(Into::into),
        Command::Inspect(args) => vmm::inspect::inspect(&args.store, args.epoch, args.page)
            .map(|()| RunEnd::Stopped)
            .map_err(Into::into),
        Command::Verify(args) => vmm::inspect::verify(&args.store)
            .map(|()| RunEnd::Stopped)
            .map_err(Into::into),
        Command::Diff(args) => vmm::tools::diff(&args.store, args.a, args.b)
            .map(|()| RunEnd::Stopped)
            .map_err(Into::into),
        Command::Fork(args) => vmm::tools::fork(&args.store, args.epoch, &args.new)
            .map(|_| RunEnd::Stopped)
            .map_err(Into::into),
        Command::Status(a) => api_command(&a, "GET", "/status").map(|()| RunEnd::Stopped),
        Command::Checkpoint(a) => api_command(&a, "PUT", "/checkpoint").map(|()| RunEnd::Stopped),
        Command::Pause(a) => api_command(&a, "PUT", "/pause").map(|()| RunEnd::Stopped),
        Command::Resume(a) => api_command(&a, "PUT", "/resume").map(|()| RunEnd::Stopped),
        Command::Stop(a) => api_command(&a, "PUT", "/stop").map(|()| RunEnd::Stopped),
        Command::Top(a) => {
            vmm::top::run(&a.api_sock, std::time::Duration::from_millis(a.refresh_ms))
                .map(|()| RunEnd::Stopped)
                .map_err(Into::into)
        }
    };
    match result {
        Ok(end) => {
            log::info!("guest ended: {end:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("evm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_interval("10ms").unwrap(), Duration::from_millis(10));
        assert_eq!(parse_interval("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_interval("2").unwrap(), Duration::from_secs(2));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("9ms").is_err());
        assert!(parse_interval("11m").is_err());
        assert!(parse_interval("1h").is_err());
        assert!(parse_interval("x").is_err());
        assert!(parse_interval("-1s").is_err());
    }
}
