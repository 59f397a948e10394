//! MQTT 3.1 ("MQIsdp", protocol level 3) clients against the real broker.
//!
//! Goal: old devices that still speak 3.1 connect, subscribe and exchange
//! QoS 0/1 messages with 3.1.1 and 5.0 clients, across shards. Method: raw
//! sockets with `tessera_proto` (rumqttc has no 3.1), a 2-shard broker, client
//! ids chosen so publisher and subscriber sit on different shards.

mod common;

use common::{Broker, RawClient, connect_packet, id_on_shard};
use tessera_proto::{Packet, ProtocolVersion, QoS, ReasonCode};

#[test]
fn mqtt31_clients_exchange_messages_with_newer_clients_across_shards() {
    let broker = Broker::start();
    let sub_id = id_on_shard("v31-sub", 0);
    let pub_id = id_on_shard("v31-pub", 1);
    let mut sub = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1, &sub_id, true, 30),
    );
    assert_eq!(
        sub.subscribe(1, &[("v31/#", QoS::AtLeastOnce)]),
        [ReasonCode::GrantedQoS1]
    );

    // A 3.1 publisher and a 5.0 publisher, both on the other shard.
    let mut pub31 = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1, &pub_id, true, 30),
    );
    pub31.publish("v31/a", b"from 3.1", QoS::AtLeastOnce, 7);
    let v5_id = id_on_shard("v31-pub5", 1);
    let mut pub5 = RawClient::connect_ok(
        broker.addr(),
        connect_packet(ProtocolVersion::V5, &v5_id, true, 30),
    );
    pub5.publish("v31/b", b"from 5.0", QoS::AtMostOnce, 0);

    let first = sub.recv_publish();
    assert_eq!(
        (first.topic.as_str(), &first.payload[..]),
        ("v31/a", &b"from 3.1"[..])
    );
    assert_eq!(first.qos, QoS::AtLeastOnce);
    let second = sub.recv_publish();
    assert_eq!(
        (second.topic.as_str(), &second.payload[..]),
        ("v31/b", &b"from 5.0"[..])
    );

    // PINGREQ works in 3.1 too.
    sub.send(&Packet::PingReq);
    assert!(matches!(sub.recv(), Packet::PingResp));
}
