//! The floor under any RPC's overhead on this machine: a plain blocking ping-pong between two
//! processes over loopback TCP or a Unix socket, with the request and answer sizes of a
//! decoding step and the server busy for the engine's time before each answer. No HTTP/2, no
//! protobuf, no async runtime: what is left is the kernel's socket path and waking a thread
//! whose CPU went idle while the other side computed (costly in a virtual machine).
//!
//! `scripts/bench/bench_server.py` runs it beside the gRPC measurement and prints the floor's p50
//! next to the gRPC overhead. Prints one JSON object: p10/p50/p90 of round trip minus compute.
//!
//!     cargo bench --bench bench_socket_floor -- --transport tcp --compute-us 1700 \
//!         --request-bytes 2330 --response-bytes 8100

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

mod driver_args;

/// The script that runs this driver.
const SCRIPT: &str = "scripts/bench/bench_server.py";

#[derive(Parser)]
#[command(name = "bench_socket_floor", bin_name = "bench_socket_floor")]
struct Args {
    /// tcp or unix.
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Server time per step before it answers (busy, as the engine is).
    #[arg(long, default_value_t = 1700)]
    compute_us: u64,
    #[arg(long, default_value_t = 2330)]
    request_bytes: usize,
    #[arg(long, default_value_t = 8100)]
    response_bytes: usize,
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    /// Internal: run as the server process, listening on this address or socket path.
    #[arg(long, hide = true)]
    serve: Option<String>,
}

fn busy(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn serve(mut s: impl Read + Write, a: &Args) -> std::io::Result<()> {
    let mut req = vec![0u8; a.request_bytes];
    let resp = vec![7u8; a.response_bytes];
    loop {
        if s.read_exact(&mut req).is_err() {
            return Ok(()); // the client is done
        }
        busy(Duration::from_micros(a.compute_us));
        s.write_all(&resp)?;
    }
}

fn client(mut s: impl Read + Write, a: &Args) -> std::io::Result<Vec<f64>> {
    let req = vec![1u8; a.request_bytes];
    let mut resp = vec![0u8; a.response_bytes];
    let mut over = Vec::with_capacity(a.steps);
    for _ in 0..a.steps {
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        over.push(t.elapsed().as_secs_f64() * 1e6 - a.compute_us as f64);
    }
    over.sort_by(f64::total_cmp);
    Ok(over)
}

fn main() -> anyhow::Result<()> {
    let argv = driver_args::args("bench_socket_floor", SCRIPT);
    let a = Args::parse_from(&argv);
    if let Some(addr) = &a.serve {
        if a.transport == "unix" {
            let l = UnixListener::bind(addr)?;
            println!("ready");
            serve(l.accept()?.0, &a)?;
        } else {
            let l = TcpListener::bind(addr)?;
            println!("ready {}", l.local_addr()?);
            let (s, _) = l.accept()?;
            s.set_nodelay(true)?;
            serve(s, &a)?;
        }
        return Ok(());
    }

    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("floor.sock");
    let listen = if a.transport == "unix" {
        sock.display().to_string()
    } else {
        "127.0.0.1:0".to_string()
    };
    let mut child = Command::new(std::env::current_exe()?)
        .args(&argv[1..])
        .args(["--serve", &listen])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    {
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    }
    let over = if a.transport == "unix" {
        client(UnixStream::connect(&sock)?, &a)?
    } else {
        let addr = line.trim().strip_prefix("ready ").unwrap_or_default();
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        client(s, &a)?
    };
    child.wait()?;
    let q = |p: f64| over[((over.len() - 1) as f64 * p).round() as usize];
    println!(
        "{}",
        serde_json::json!({
            "transport": a.transport,
            "compute_us": a.compute_us,
            "request_bytes": a.request_bytes,
            "response_bytes": a.response_bytes,
            "steps": over.len(),
            "overhead_p10_us": q(0.1),
            "overhead_p50_us": q(0.5),
            "overhead_p90_us": q(0.9),
        })
    );
    Ok(())
}
