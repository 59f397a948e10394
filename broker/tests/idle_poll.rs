//! Goal: `server.idle_poll_us` (shards poll for I/O before they sleep) changes
//! only when a shard sleeps, never what it does: messages still cross shards in
//! order at every QoS, keep-alive timers still fire (and the will goes out), and
//! a broker with nothing to do still goes to sleep instead of holding its CPUs.
//!
//! Method: the real `broker` binary with two shards and a 20 ms poll, real
//! rumqttc 5.0 clients whose ids land on different shards, a raw client that
//! stops talking, and the broker's own CPU time from `/proc/PID/stat`. Every
//! wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::{Broker, RawClient, connect_packet, id_on_shard, will};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet as P5;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tessera_proto::{ProtocolVersion, QoS as PQoS, ReasonCode};

/// Long enough that the shards poll through every gap in this test's traffic.
const IDLE_POLL: [(&str, &str); 1] = [("TESSERA_SERVER__IDLE_POLL_US", "20000")];

/// Bound of every wait for traffic.
const TIMEOUT: Duration = Duration::from_secs(20);

fn options(broker: &Broker, id: &str) -> MqttOptions {
    let addr = broker.addr();
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// The broker's user + system CPU time in clock ticks (`/proc/PID/stat`
/// fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // The command name is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state), so fields 14 and 15 are at 11 and 12.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).expect("positive CLK_TCK")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_shards_deliver_across_shards_in_order_and_sleep_when_idle() {
    let broker = Broker::start_with(&["--shards", "2"], &IDLE_POLL);
    broker.wait_log(
        "shards poll for I/O before they sleep",
        Duration::from_secs(5),
    );

    // Subscriber on shard 0, publisher on shard 1: every message is forwarded.
    let (sub, mut sub_loop) = AsyncClient::new(options(&broker, &id_on_shard("poll-sub", 0)), 100);
    let (publ, mut pub_loop) = AsyncClient::new(options(&broker, &id_on_shard("poll-pub", 1)), 100);
    sub.subscribe("poll/#", QoS::ExactlyOnce).await.unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let ev = tokio::time::timeout_at(deadline.into(), sub_loop.poll())
            .await
            .expect("SUBACK in time")
            .expect("subscriber connection");
        if let Event::Incoming(P5::SubAck(_)) = ev {
            break;
        }
    }
    tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });

    // Paced sends, so the shards run out of work between messages and poll.
    const PER_QOS: u32 = 30;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        for i in 0..PER_QOS {
            let payload = format!("{}:{i}", qos as u8);
            publ.publish(format!("poll/{}", qos as u8), qos, false, payload)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    let mut got: Vec<String> = Vec::new();
    while got.len() < 3 * PER_QOS as usize {
        let Ok(polled) = tokio::time::timeout_at(deadline.into(), sub_loop.poll()).await else {
            panic!("only {} of {} messages: {got:?}", got.len(), 3 * PER_QOS);
        };
        if let Event::Incoming(P5::Publish(p)) = polled.expect("subscriber connection") {
            got.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
    }
    let want: Vec<String> = [0, 1, 2]
        .iter()
        .flat_map(|q| (0..PER_QOS).map(move |i| format!("{q}:{i}")))
        .collect();
    assert_eq!(got, want, "every message once, in order per publisher");

    // Nothing to do now: both shards must park. A shard that kept polling would
    // burn a whole core (2 s of CPU over 2 s per shard); sleeping ones use a few
    // milliseconds. Half a core for both together leaves room for a slow machine.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = broker.pid();
    let before = cpu_ticks(pid);
    let window = Duration::from_secs(2);
    tokio::time::sleep(window).await;
    let used = cpu_ticks(pid) - before;
    let budget = clock_ticks_per_s() * window.as_secs() / 2;
    assert!(
        used < budget,
        "an idle broker with idle_poll_us used {used} CPU ticks in {window:?} (budget {budget}): \
         its shards never went to sleep"
    );
}

#[test]
fn polling_shards_still_fire_keep_alive_timers_and_the_will() {
    let broker = Broker::start_with(&["--shards", "2"], &IDLE_POLL);
    let addr = broker.addr();
    let mut watcher = RawClient::connect_ok(
        addr,
        connect_packet(ProtocolVersion::V5, &id_on_shard("poll-watch", 0), true, 30),
    );
    watcher.subscribe(1, &[("poll/will", PQoS::AtLeastOnce)]);
    // Keep-alive 1 s, then silence: the broker must close it after 1.5 s
    // (DISCONNECT 0x8D) and publish its will, which takes a timer on the shard
    // that owns it.
    let mut connect = connect_packet(ProtocolVersion::V5, &id_on_shard("poll-silent", 1), true, 1);
    connect.will = Some(will("poll/will", b"gone", PQoS::AtLeastOnce));
    let mut silent = RawClient::connect_ok(addr, connect);
    let started = Instant::now();
    let will = watcher.recv_publish();
    assert_eq!(&will.payload[..], b"gone");
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "will after {:?}, before the keep-alive ran out",
        started.elapsed()
    );
    silent.expect_disconnect_then_close(ReasonCode::KeepAliveTimeout);
}
