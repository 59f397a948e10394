// One MQTT.js client: connect to URL, subscribe to a topic of its own at QoS 1,
// publish PAYLOAD_BYTES to it, exit 0 when the message comes back, 1 on error
// or after 5 s. Usage: node roundtrip.js URL [PROTOCOL_VERSION] [PAYLOAD_BYTES]
const mqtt = require('mqtt');
const [url, version = '4', bytes = '5'] = process.argv.slice(2);
const id = 'mqttjs-' + Math.random().toString(16).slice(2);
// The interop script's CA is throwaway; the point is the broker's TLS, not
// certificate checking by the client.
const c = mqtt.connect(url, { protocolVersion: Number(version), clientId: id, rejectUnauthorized: false, reconnectPeriod: 0 });
const timer = setTimeout(() => { console.log(`${url} v${version}: TIMEOUT`); process.exit(1); }, 5000);
c.on('error', (e) => { console.log(`${url} v${version}: ERROR ${e.message}`); process.exit(1); });
c.on('connect', () => {
  c.subscribe(`interop/${id}`, { qos: 1 }, (err) => {
    if (err) { console.log(`${url} v${version}: SUBSCRIBE ${err.message}`); process.exit(1); }
    c.publish(`interop/${id}`, 'x'.repeat(Number(bytes)), { qos: 1 });
  });
});
c.on('message', (topic, payload) => {
  clearTimeout(timer);
  const ok = payload.length === Number(bytes);
  console.log(`${url} v${version}: ${ok ? 'ok' : 'WRONG PAYLOAD'} (${payload.length} bytes)`);
  c.end(false, () => process.exit(ok ? 0 : 1));
});
