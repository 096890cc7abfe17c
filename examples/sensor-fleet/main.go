// Command sensor-fleet simulates a fleet of battery-powered sensors that
// publish packed binary telemetry to Beacon, one MQTT 5 connection per
// device, each with a retained online/offline status and reconnection with
// exponential backoff.
//
//	go run ./examples/sensor-fleet -devices 50 -interval 5s
//	go run ./examples/sensor-fleet -credentials creds.txt
//
// Every interval (±20%) a device publishes a 7-byte little-endian frame to
// devices/<id>/telemetry: int16 temperature in 0.01 °C, uint8 humidity in
// 0.5 %, uint16 battery in mV, uint8 ok, int8 RSSI in dBm. README.md has the
// Beacon codec entry that decodes it and how to provision the devices.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"github.com/beaconmq/beacon/devices"
)

const (
	frameSize       = 7                // bytes in a telemetry frame
	keepAlive       = 30               // seconds
	sessionExpiry   = 3600             // seconds the broker keeps a device's session while it is away
	publishTimeout  = 10 * time.Second // for one PUBLISH and its acknowledgement
	shutdownTimeout = 5 * time.Second  // for the offline status and DISCONNECT of one device
	summaryInterval = 10 * time.Second
)

func main() {
	code := 0
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
	case err != nil:
		fmt.Fprintf(os.Stderr, "sensor-fleet: %v\n", err)
		code = 2
	default:
		level := slog.LevelInfo
		if cfg.Verbose {
			level = slog.LevelDebug
		}
		log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		if err := run(ctx, cfg, log); err != nil {
			log.Error("sensor-fleet stopped", "error", err)
			code = 1
		}
		stop()
	}
	os.Exit(code)
}

// config is what the flags set.
type config struct {
	Broker      string        // mqtt://host[:port] or mqtts://host[:port]
	Devices     int           // fleet size; with Credentials, the first Devices of the file and 0 = all
	Interval    time.Duration // between two frames of one device, ±20%
	Credentials string        // file of "<id> <secret>" lines; "" = ids Prefix-001.. without passwords
	Prefix      string
	QoS         int
	Duration    time.Duration // 0 = until the context ends
	Verbose     bool

	summaryEvery time.Duration // 0 = summaryInterval; tests shorten it
	seed         uint64        // 0 = random; tests fix it
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var cfg config
	fs := flag.NewFlagSet("sensor-fleet", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&cfg.Broker, "broker", "mqtt://127.0.0.1:1883", "broker `URL`: mqtt://host[:port] or mqtts://host[:port]")
	fs.IntVar(&cfg.Devices, "devices", 50, "number of devices; with -credentials, how many of the file's devices (all unless set)")
	fs.DurationVar(&cfg.Interval, "interval", 5*time.Second, "telemetry period per device, with ±20% jitter")
	fs.StringVar(&cfg.Credentials, "credentials", "", "`file` of \"<id> <secret>\" lines, one per device")
	fs.StringVar(&cfg.Prefix, "prefix", "sensor", "device ids <prefix>-001.. when there is no -credentials file (connecting without password)")
	fs.IntVar(&cfg.QoS, "qos", 1, "QoS of telemetry messages: 0, 1 or 2")
	fs.DurationVar(&cfg.Duration, "duration", 0, "stop after this long; 0 = until SIGINT or SIGTERM")
	fs.BoolVar(&cfg.Verbose, "v", false, "log every message and the MQTT client's errors")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	devicesSet := false
	fs.Visit(func(f *flag.Flag) { devicesSet = devicesSet || f.Name == "devices" })
	if cfg.Credentials != "" && !devicesSet {
		cfg.Devices = 0
	}
	return cfg, cfg.validate()
}

// validate checks cfg; its errors name the flag.
func (c config) validate() error {
	if _, err := c.brokerURL(); err != nil {
		return err
	}
	switch {
	case c.Devices < 0, c.Devices == 0 && c.Credentials == "":
		return errors.New("-devices: must be at least 1")
	case c.Interval <= 0:
		return errors.New("-interval: must be positive")
	case c.QoS < 0 || c.QoS > 2:
		return fmt.Errorf("-qos: %d is not 0, 1 or 2", c.QoS)
	case c.Duration < 0:
		return errors.New("-duration: must not be negative")
	case c.Credentials == "" && !devices.ValidID(deviceID(c.Prefix, c.Devices)):
		return fmt.Errorf("-prefix: %q does not make device ids (1-64 letters, digits, '.', '_' or '-')", c.Prefix)
	}
	return nil
}

// brokerURL parses -broker and adds the default port of its scheme.
func (c config) brokerURL() (*url.URL, error) {
	u, err := url.Parse(c.Broker)
	if err != nil {
		return nil, fmt.Errorf("-broker: %w", err)
	}
	var port string
	switch u.Scheme {
	case "mqtt":
		port = "1883"
	case "mqtts":
		port = "8883"
	default:
		return nil, fmt.Errorf("-broker: %q: use mqtt://host[:port] or mqtts://host[:port]", c.Broker)
	}
	if u.User != nil {
		return nil, errors.New("-broker: the URL must not hold credentials; use -credentials")
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("-broker: %q has no host", c.Broker)
	}
	if u.Port() == "" {
		u.Host = net.JoinHostPort(u.Hostname(), port)
	}
	return u, nil
}

func deviceID(prefix string, n int) string { return fmt.Sprintf("%s-%03d", prefix, n) }

// credential is one device's identity.
type credential struct {
	id     string
	secret string // "" = connect with the id as username and no password
}

// credentials returns the fleet: from the credentials file, or generated.
func (c config) credentials() ([]credential, error) {
	if c.Credentials == "" {
		out := make([]credential, c.Devices)
		for i := range out {
			out[i].id = deviceID(c.Prefix, i+1)
		}
		return out, nil
	}
	f, err := os.Open(c.Credentials)
	if err != nil {
		return nil, fmt.Errorf("-credentials: %w", err)
	}
	defer f.Close()
	creds, err := parseCredentials(f)
	if err != nil {
		return nil, fmt.Errorf("-credentials %s: %w", c.Credentials, err)
	}
	if c.Devices > len(creds) {
		return nil, fmt.Errorf("-devices %d: %s has only %d devices", c.Devices, c.Credentials, len(creds))
	}
	if c.Devices > 0 {
		creds = creds[:c.Devices]
	}
	return creds, nil
}

// parseCredentials reads lines of "<id> <secret>"; blank lines and lines
// starting with # are skipped. Errors name the line but never echo it: it
// may hold a secret.
func parseCredentials(r io.Reader) ([]credential, error) {
	var out []credential
	seen := map[string]int{}
	sc := bufio.NewScanner(r)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("line %d: want \"<id> <secret>\", found %d fields", n, len(f))
		}
		if !devices.ValidID(f[0]) {
			return nil, fmt.Errorf("line %d: %q is not a device id (1-64 letters, digits, '.', '_' or '-')", n, f[0])
		}
		if prev, dup := seen[f[0]]; dup {
			return nil, fmt.Errorf("line %d: device %q is already on line %d", n, f[0], prev)
		}
		seen[f[0]] = n
		out = append(out, credential{id: f[0], secret: f[1]})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("line %d: %w", n+1, err)
	}
	if len(out) == 0 {
		return nil, errors.New("no devices in the file")
	}
	return out, nil
}

// reading is one set of sensor values.
type reading struct {
	Temperature float64 // °C
	Humidity    float64 // % relative humidity
	Battery     float64 // V
	OK          bool
	RSSI        int // dBm
}

// Ranges of the random walks.
const (
	tempMin, tempMax         = 18.0, 26.0
	humidityMin, humidityMax = 30.0, 70.0
	batteryMin, batteryMax   = 3.0, 4.2
	rssiMin, rssiMax         = -90.0, -40.0
	batteryDrain             = 0.0002 // V per reading on average: 3.0-4.2 V in about 6,000 readings
)

// sensor is the state of one simulated device: random walks that stay in
// their ranges, and a battery that drains and is replaced when flat.
type sensor struct {
	temperature, humidity, battery, rssi float64
}

func newSensor(rng *rand.Rand) sensor {
	return sensor{
		temperature: tempMin + rng.Float64()*(tempMax-tempMin),
		humidity:    humidityMin + rng.Float64()*(humidityMax-humidityMin),
		battery:     3.3 + rng.Float64()*(batteryMax-3.3),
		rssi:        rssiMin + rng.Float64()*(rssiMax-rssiMin),
	}
}

// step advances the walks and returns the new reading.
func (s *sensor) step(rng *rand.Rand) reading {
	s.temperature = walk(s.temperature, rng.NormFloat64()*0.05, tempMin, tempMax)
	s.humidity = walk(s.humidity, rng.NormFloat64()*0.25, humidityMin, humidityMax)
	s.rssi = walk(s.rssi, rng.NormFloat64(), rssiMin, rssiMax)
	s.battery -= batteryDrain * 2 * rng.Float64()
	if s.battery < batteryMin {
		s.battery = batteryMax // a fresh battery
	}
	return reading{
		Temperature: s.temperature,
		Humidity:    s.humidity,
		Battery:     s.battery,
		OK:          true,
		RSSI:        int(math.Round(s.rssi)),
	}
}

// walk moves v by d and reflects it back into [lo, hi].
func walk(v, d, lo, hi float64) float64 {
	v += d
	if v > hi {
		v = 2*hi - v
	}
	if v < lo {
		v = 2*lo - v
	}
	return min(max(v, lo), hi)
}

// encodeFrame packs r little-endian: int16 temperature×100, uint8
// humidity×2, uint16 battery in mV, uint8 ok, int8 RSSI. Values outside a
// field's range saturate instead of wrapping.
func encodeFrame(r reading) []byte {
	b := make([]byte, frameSize)
	binary.LittleEndian.PutUint16(b[0:], uint16(int16(quantize(r.Temperature*100, math.MinInt16, math.MaxInt16))))
	b[2] = uint8(quantize(r.Humidity*2, 0, math.MaxUint8))
	binary.LittleEndian.PutUint16(b[3:], uint16(quantize(r.Battery*1000, 0, math.MaxUint16)))
	if r.OK {
		b[5] = 1
	}
	b[6] = byte(int8(quantize(float64(r.RSSI), math.MinInt8, math.MaxInt8)))
	return b
}

// quantize rounds v to the nearest integer in [lo, hi].
func quantize(v, lo, hi float64) int64 {
	return int64(min(max(math.Round(v), lo), hi))
}

// stats are the fleet's counters. published and acked count telemetry
// frames; errors count failed publishes of any kind.
type stats struct {
	published, acked, skipped, errors atomic.Int64
}

// run simulates the fleet until ctx ends or cfg.Duration passes, then
// publishes every device's offline status and disconnects it.
func run(ctx context.Context, cfg config, log *slog.Logger) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	u, _ := cfg.brokerURL()
	creds, err := cfg.credentials()
	if err != nil {
		return err
	}
	if cfg.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.Duration)
		defer cancel()
	}
	seed := cfg.seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	every := cfg.summaryEvery
	if every <= 0 {
		every = summaryInterval
	}

	st := &stats{}
	fleet := make([]*device, len(creds))
	for i, c := range creds {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		fleet[i] = &device{
			id: c.id, secret: c.secret, url: u, qos: byte(cfg.QoS), interval: cfg.Interval,
			verbose: cfg.Verbose, log: log.With("device", c.id), stats: st,
			rng: rng, sensor: newSensor(rng), connected: make(chan struct{}, 1),
		}
	}
	log.Info("starting fleet", "devices", len(fleet), "broker", u.Redacted(), "interval", cfg.Interval, "qos", cfg.QoS)

	var wg sync.WaitGroup
	for _, d := range fleet {
		wg.Go(func() { d.run(ctx) })
	}
	summary := func(msg string) {
		up := 0
		for _, d := range fleet {
			if d.up.Load() {
				up++
			}
		}
		log.Info(msg, "published", st.published.Load(), "acked", st.acked.Load(), "errors", st.errors.Load(),
			"skipped", st.skipped.Load(), "connected", up, "devices", len(fleet))
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for done := false; !done; {
		select {
		case <-tick.C:
			summary("summary")
		case <-ctx.Done():
			done = true
		}
	}
	log.Info("stopping fleet: publishing offline status and disconnecting")
	wg.Wait()
	summary("fleet stopped")
	return nil
}

// device is one simulated sensor with its own MQTT connection.
type device struct {
	id, secret string
	url        *url.URL
	qos        byte
	interval   time.Duration
	verbose    bool
	log        *slog.Logger
	stats      *stats

	rng    *rand.Rand // used by the run goroutine only
	sensor sensor
	cm     *autopaho.ConnectionManager

	up        atomic.Bool
	connects  atomic.Int64
	connected chan struct{} // a (re)connection waits for its online status
	failing   bool          // the last telemetry publish failed; run goroutine only
}

func (d *device) statusTopic() string    { return "devices/" + d.id + "/status" }
func (d *device) telemetryTopic() string { return "devices/" + d.id + "/telemetry" }

// clientConfig is the autopaho configuration of d.
func (d *device) clientConfig() autopaho.ClientConfig {
	cc := autopaho.ClientConfig{
		ServerUrls:                    []*url.URL{d.url},
		KeepAlive:                     keepAlive,
		CleanStartOnInitialConnection: false,
		SessionExpiryInterval:         sessionExpiry,
		ReconnectBackoff:              reconnectBackoff(),
		ConnectTimeout:                10 * time.Second,
		ConnectUsername:               d.id,
		ConnectPassword:               []byte(d.secret),
		WillMessage:                   &paho.WillMessage{Topic: d.statusTopic(), Payload: []byte("offline"), QoS: 1, Retain: true},
		OnConnectionUp:                d.onConnectionUp,
		OnConnectionDown:              d.onConnectionDown,
		OnConnectError:                d.onConnectError,
		ClientConfig: paho.ClientConfig{
			ClientID: d.id,
			// autopaho calls one of these once per lost connection, but
			// not after Disconnect.
			OnClientError: func(err error) { d.log.Info("connection lost", "error", err) },
			OnServerDisconnect: func(p *paho.Disconnect) {
				var rs string
				if p.Properties != nil {
					rs = p.Properties.ReasonString
				}
				d.log.Info("connection lost", "reason_code", fmt.Sprintf("0x%02x", p.ReasonCode),
					"reason", reason(p.Packet().Reason(), rs))
			},
		},
	}
	if d.url.Scheme == "mqtts" {
		cc.TlsCfg = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if d.verbose {
		l := pahoLogger{d.log}
		cc.Errors, cc.PahoErrors = l, l
	}
	return cc
}

// reconnectBackoff waits before connection attempt n: up to 1 s before
// the first one, so that a fleet does not reconnect all at once after a
// broker restart, then a random delay from 1 s up to a ceiling that starts
// at 5 s and doubles to 60 s.
func reconnectBackoff() autopaho.Backoff {
	exp := autopaho.NewExponentialBackoff(time.Second, time.Minute, 5*time.Second, 2)
	return func(attempt int) time.Duration {
		if attempt == 0 {
			return rand.N(time.Second)
		}
		return exp(attempt)
	}
}

// reason is the name of a reason code, from paho's description ("Bad
// User Name or Password - The Server does not ..."), and the server's
// reason string, if any.
func reason(description, reasonString string) string {
	name, _, _ := strings.Cut(description, " - ")
	if reasonString != "" {
		return name + ": " + reasonString
	}
	return name
}

// onConnectError runs on its own goroutine after each failed attempt.
func (d *device) onConnectError(err error) {
	var ce *autopaho.ConnackError
	if errors.As(err, &ce) {
		d.log.Info("connect refused", "reason_code", fmt.Sprintf("0x%02x", ce.ReasonCode),
			"reason", reason((&packets.Connack{ReasonCode: ce.ReasonCode}).Reason(), ce.Reason))
		return
	}
	d.log.Info("connect failed", "error", err)
}

// onConnectionUp runs on autopaho's goroutine and must not block.
func (d *device) onConnectionUp(_ *autopaho.ConnectionManager, ca *paho.Connack) {
	d.up.Store(true)
	msg := "connected"
	if d.connects.Add(1) > 1 {
		msg = "reconnected"
	}
	d.log.Info(msg, "session_present", ca.SessionPresent)
	select {
	case d.connected <- struct{}{}:
	default:
	}
}

func (d *device) onConnectionDown() bool {
	d.up.Store(false)
	return true // reconnect
}

// run connects d and publishes until ctx ends, then publishes the offline
// status and disconnects.
func (d *device) run(ctx context.Context) {
	// The connection outlives ctx: autopaho would disconnect at once when
	// its context ends, before the offline status goes out.
	connCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	cm, err := autopaho.NewConnection(connCtx, d.clientConfig())
	if err != nil {
		d.log.Error("cannot start connection", "error", err)
		return
	}
	d.cm = cm

	next := time.NewTimer(time.Hour) // armed at the first connection
	next.Stop()
	defer next.Stop()
	started := false
	for {
		select {
		case <-ctx.Done():
			d.shutdown()
			return
		case <-d.connected:
			d.publishStatus(ctx, "online")
			if !started {
				started = true
				next.Reset(rand.N(d.interval)) // spread the fleet over the first interval
			}
		case <-next.C:
			d.publishTelemetry(ctx)
			next.Reset(d.jittered())
		}
	}
}

// jittered is the interval ±20%.
func (d *device) jittered() time.Duration {
	return time.Duration(float64(d.interval) * (0.8 + 0.4*d.rng.Float64()))
}

func (d *device) publish(ctx context.Context, p *paho.Publish) error {
	ctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	_, err := d.cm.Publish(ctx, p) // a refusal (reason code >= 0x80) is an error too
	return err
}

func (d *device) publishStatus(ctx context.Context, status string) {
	err := d.publish(ctx, &paho.Publish{Topic: d.statusTopic(), QoS: 1, Retain: true, Payload: []byte(status)})
	switch {
	case err == nil:
		d.log.Debug("status published", "topic", d.statusTopic(), "status", status)
	case errors.Is(err, autopaho.ConnectionDownError):
		d.log.Debug("status not published: not connected", "status", status)
	case ctx.Err() != nil:
	default:
		d.stats.errors.Add(1)
		d.log.Info("status publish failed", "status", status, "error", err)
	}
}

func (d *device) publishTelemetry(ctx context.Context) {
	r := d.sensor.step(d.rng) // the sensor measures whether or not it is connected
	err := d.publish(ctx, &paho.Publish{Topic: d.telemetryTopic(), QoS: d.qos, Payload: encodeFrame(r)})
	if errors.Is(err, autopaho.ConnectionDownError) {
		d.stats.skipped.Add(1)
		d.log.Debug("telemetry skipped: not connected")
		return
	}
	d.stats.published.Add(1)
	if err != nil {
		if ctx.Err() != nil {
			return // stopping
		}
		d.stats.errors.Add(1)
		level := slog.LevelDebug
		if !d.failing {
			level = slog.LevelInfo // the first failure of a run of them
		}
		d.failing = true
		d.log.Log(ctx, level, "telemetry publish failed", "topic", d.telemetryTopic(), "error", err)
		return
	}
	if d.failing {
		d.failing = false
		d.log.Info("telemetry publishing again")
	}
	if d.qos > 0 {
		d.stats.acked.Add(1)
	}
	d.log.Debug("telemetry published", "topic", d.telemetryTopic(), "temperature", r.Temperature,
		"humidity", r.Humidity, "battery", r.Battery, "rssi", r.RSSI)
}

// shutdown publishes the offline status, which the broker would not send
// as the will after a clean DISCONNECT, then disconnects.
func (d *device) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	d.publishStatus(ctx, "offline")
	if err := d.cm.Disconnect(ctx); err != nil {
		d.log.Info("disconnect", "error", err)
	}
	d.up.Store(false)
}

// pahoLogger sends the MQTT client's error log to slog at debug level.
type pahoLogger struct{ log *slog.Logger }

func (l pahoLogger) Println(v ...any) {
	l.log.Debug("mqtt client", "detail", strings.TrimSpace(fmt.Sprintln(v...)))
}

func (l pahoLogger) Printf(format string, v ...any) {
	l.log.Debug("mqtt client", "detail", strings.TrimSpace(fmt.Sprintf(format, v...)))
}
