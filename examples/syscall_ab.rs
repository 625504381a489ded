//! One loopback round trip of four socket calls (A sends 64 bytes, B receives them, B answers,
//! A receives), through std/libc against rustix's raw system calls, alternated in one process:
//! ROUNDS rounds of COUNT round trips each, the order swapped every round, then the median and
//! fastest ns per round trip of each. The host's drift between separate runs (criterion's,
//! `benches/net.rs`) is as large as the difference; alternating in one process cancels it.
//!
//! Run: `taskset -c 0 cargo run --release --example syscall_ab -- [ROUNDS] [COUNT]` (40, 50000).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use rustix::net::{RecvFlags, SendFlags};

const MESSAGE: [u8; 64] = [b'x'; 64];

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(40, |a| a.parse().expect("ROUNDS"));
    let count: u32 = args.next().map_or(50_000, |a| a.parse().expect("COUNT"));
    // keygate is multi-threaded: so is this process, for glibc's wrappers to behave as there.
    let (_park_tx, park_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || park_rx.recv());

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut b, _) = listener.accept().unwrap();
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    let mut buf = [0u8; 4096];
    let (mut libc, mut raw) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for raw_calls in [round % 2 == 1, round % 2 == 0] {
            let t = Instant::now();
            for _ in 0..count {
                if raw_calls {
                    rustix::net::send(&a, &MESSAGE, SendFlags::NOSIGNAL).unwrap();
                    rustix::net::recv(&b, &mut buf, RecvFlags::empty()).unwrap();
                    rustix::net::send(&b, &MESSAGE, SendFlags::NOSIGNAL).unwrap();
                    rustix::net::recv(&a, &mut buf, RecvFlags::empty()).unwrap();
                } else {
                    a.write_all(&MESSAGE).unwrap();
                    let _ = b.read(&mut buf).unwrap();
                    b.write_all(&MESSAGE).unwrap();
                    let _ = a.read(&mut buf).unwrap();
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / f64::from(count);
            if raw_calls { &mut raw } else { &mut libc }.push(ns);
        }
    }
    for (name, v) in [("libc", &mut libc), ("raw", &mut raw)] {
        v.sort_by(f64::total_cmp);
        println!(
            "{name}: median {:.0} ns, fastest {:.0} ns per round trip ({rounds} rounds of {count})",
            v[v.len() / 2],
            v[0]
        );
    }
}
