// MQTT.js from Node over ws://, as a non-browser client connects: no Origin
// header unless one is given. Usage: node mqttjs-ws.js URL [ORIGIN]
// Prints "roundtrip <payload>" after its own message comes back, or
// "error <message>" when the connection is refused, and exits.
const mqtt = require('mqtt');

const [url, origin] = process.argv.slice(2);
const opts = { clientId: 'node-ws', reconnectPeriod: 0, connectTimeout: 10000, protocolVersion: 5 };
if (origin) opts.wsOptions = { origin };
const client = mqtt.connect(url, opts);
let finished = false;
const done = (line, code) => { if (finished) return; finished = true; console.log(line); client.end(true, () => process.exit(code)); };
client.on('error', (err) => done('error ' + err.message, 1));
// A refused handshake closes the stream without an 'error' event on the
// client (MQTT.js would reconnect silently): report what the socket saw.
let streamError = '';
const watch = () => client.stream && client.stream.on && client.stream.on('error', (err) => { streamError = err.message; });
watch();
client.on('close', () => { if (!client.connected) done('error closed before CONNACK ' + streamError, 1); });
client.on('connect', () => {
  client.subscribe('node/echo', { qos: 1 }, (err) => {
    if (err) return done('error ' + err.message, 1);
    client.publish('node/echo', 'hello from node', { qos: 1 });
  });
});
client.on('message', (topic, payload) => done('roundtrip ' + payload.toString(), 0));
setTimeout(() => done('error timeout', 1), 20000);
