//! `evm`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vmm::config::{self, VmConfig};
use vmm::vm::{self, RunEnd};

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
    /// Boot a guest and attach its serial console to stdin/stdout.
    ///
    /// The console escape is Ctrl-A x (Ctrl-A Ctrl-A sends a Ctrl-A).
    /// evm exits 0 when the guest powers off or reboots, or on the escape.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Linux bzImage, or evm's probe guest image.
    #[arg(long, value_name = "BZIMAGE")]
    kernel: PathBuf,
    /// Initramfs to load with the kernel.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default (for Linux:
    /// "console=ttyS0 pci=off panic=-1 quiet"; for the probe guest: empty).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory (K, M, G, T suffixes).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    mem: String,
    /// Number of vCPUs (1 to 8).
    #[arg(long, value_name = "N", default_value_t = 2)]
    vcpus: u64,
    /// Raw disk image, exposed as virtio-blk (/dev/vda).
    #[arg(long, value_name = "IMG")]
    disk: Option<PathBuf>,
}

fn run(args: RunArgs) -> anyhow::Result<RunEnd> {
    let mem_bytes = config::parse_size(&args.mem)?;
    let mem_bytes = config::check_mem(&args.mem, mem_bytes, config::host_ram())?;
    let vcpus = config::check_vcpus(args.vcpus)?;
    let cfg = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_bytes,
        vcpus,
        disk: args.disk,
    };
    Ok(vm::run(&cfg)?)
}

fn main() -> ExitCode {
    vmm::logger::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
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
