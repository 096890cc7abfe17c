package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/beaconmq/beacon/broker"
	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/storage"
)

const devicesUsage = `Usage:
  beacon devices add NAME [--type T] [--tag k=v]... [--name DISPLAY] [--secret-stdin]
  beacon devices import --mosquitto-passwd FILE [--type T] [--tag k=v]...
  beacon devices list [--online]
  beacon devices show ID
  beacon devices rotate ID
  beacon devices disable ID
  beacon devices enable ID
  beacon devices rm ID

They work on the data directory of a stopped broker, or through the admin API
of a running one, found by the file it writes in its data directory (or at
http.addr with auth.admin_token; or --server and --token).
Flags: --config, --data-dir, --server URL, --token T, --json.
`

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// parseInterspersed parses flags that may stand before or after the
// positional arguments.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// deviceAdmin is what the devices command needs, from the data directory
// or from the admin API.
type deviceAdmin interface {
	Add(n devices.NewDevice) (devices.Device, string, error)
	List(online *bool) ([]devices.Device, error)
	Get(id string) (devices.Device, error)
	Update(id string, u devices.Update) (devices.Device, error)
	Rotate(id string) (string, error)
	Remove(id string) error
}

func runDevices(args, environ []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stdout, devicesUsage)
		return 0
	}
	verb, args := args[0], args[1:]
	if verb == "import" {
		return runDevicesImport(args, environ, stdout, stderr)
	}
	fs := newFlags("devices "+verb, stderr)
	server := fs.String("server", "", "admin API base URL of a running broker, e.g. http://127.0.0.1:8080")
	token := fs.String("token", "", "admin token (default: auth.admin_token)")
	asJSON := fs.Bool("json", false, "print JSON")
	typ := fs.String("type", "", "device type (add)")
	name := fs.String("name", "", "display name (add)")
	online := fs.Bool("online", false, "only online devices (list)")
	secretStdin := fs.Bool("secret-stdin", false, "read the device's secret (one line) from standard input instead of generating one (add)")
	var tags stringList
	fs.Var(&tags, "tag", "k=v tag, repeatable (add)")
	pos, err := parseInterspersed(fs.FlagSet, args)
	if err != nil {
		return reportFlagErr(err, stderr)
	}
	cfg, err := configFromFlags(fs, environ)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 2
	}
	need := 1
	if verb == "list" {
		need = 0
	}
	if len(pos) != need {
		fmt.Fprintf(stderr, "beacon: devices %s takes %d argument(s)\n%s", verb, need, devicesUsage)
		return 2
	}
	admin, closeAdmin, err := openDeviceAdmin(cfg, *server, *token)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	defer closeAdmin()

	out := func(v any) {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(v)
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	switch verb {
	case "add":
		n := devices.NewDevice{ID: pos[0], Name: *name, Type: *typ}
		for _, kv := range tags {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				fmt.Fprintf(stderr, "beacon: --tag %q is not k=v\n", kv)
				return 2
			}
			if n.Tags == nil {
				n.Tags = map[string]string{}
			}
			n.Tags[k] = v
		}
		if *secretStdin {
			restore := noEcho(stdin, stderr)
			n.Secret, err = readSecretLine(stdin)
			restore()
			if err != nil {
				return fail(err)
			}
			if err := devices.CheckChosenSecret(n.Secret); err != nil {
				return fail(err)
			}
		}
		d, secret, err := admin.Add(n)
		if err != nil {
			return fail(err)
		}
		if *secretStdin {
			if *asJSON {
				out(map[string]any{"device": d})
				return 0
			}
			fmt.Fprintf(stdout, "device %s added with the secret read from standard input (Beacon keeps only its hash)\n", d.ID)
			return 0
		}
		if *asJSON {
			out(map[string]any{"device": d, "secret": secret})
			return 0
		}
		fmt.Fprintf(stdout, "device %s added\nsecret: %s\n\nThe secret is shown once; Beacon keeps only its hash. The device connects with\nusername %q and this secret as password, e.g.:\n  mosquitto_pub -u %s -P '%s' -t devices/%s/telemetry -m hello\n",
			d.ID, secret, d.ID, d.ID, secret, d.ID)
	case "list":
		var only *bool
		if *online {
			only = online
		}
		list, err := admin.List(only)
		if err != nil {
			return fail(err)
		}
		if *asJSON {
			out(list)
			return 0
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tTYPE\tENABLED\tONLINE\tLAST SEEN\tNAME")
		for _, d := range list {
			seen := "-"
			if !d.LastSeen.IsZero() {
				seen = d.LastSeen.Format(time.RFC3339)
			}
			fmt.Fprintf(tw, "%s\t%s\t%v\t%v\t%s\t%s\n", d.ID, orDash(d.Type), d.Enabled, d.Online, seen, d.Name)
		}
		_ = tw.Flush()
	case "show":
		d, err := admin.Get(pos[0])
		if err != nil {
			return fail(err)
		}
		out(d)
	case "rotate":
		secret, err := admin.Rotate(pos[0])
		if err != nil {
			return fail(err)
		}
		if *asJSON {
			out(map[string]string{"id": pos[0], "secret": secret})
			return 0
		}
		fmt.Fprintf(stdout, "new secret for %s: %s\n(the old one no longer works; connected sessions of the device were closed)\n", pos[0], secret)
	case "disable", "enable":
		on := verb == "enable"
		d, err := admin.Update(pos[0], devices.Update{Enabled: &on})
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "device %s %sd\n", d.ID, verb)
	case "rm", "remove":
		if err := admin.Remove(pos[0]); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "device %s removed\n", pos[0])
	default:
		fmt.Fprintf(stderr, "beacon: unknown devices command %q\n%s", verb, devicesUsage)
		return 2
	}
	return 0
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// configFromFlags loads the configuration the common flags describe.
func configFromFlags(fs *flagSet, environ []string) (broker.Config, error) {
	overrides := map[string]string{}
	fs.Visit(func(f *flag.Flag) {
		for _, fk := range flagKeys {
			if fk.flag == f.Name {
				overrides[fk.key] = f.Value.String()
			}
		}
	})
	path := *fs.config
	var env []string
	for _, kv := range environ {
		if v, ok := strings.CutPrefix(kv, "BEACON_CONFIG="); ok {
			if path == "" {
				path = v
			}
			continue
		}
		env = append(env, kv)
	}
	return broker.Load(path, env, overrides)
}

// openDeviceAdmin opens the data directory, or, when a running broker
// holds it (or --server is given), the admin API.
func openDeviceAdmin(cfg broker.Config, server, token string) (deviceAdmin, func(), error) {
	if server == "" {
		db, err := storage.Open(storage.Options{Dir: cfg.Storage.Dir, Sync: storage.SyncAlways})
		if err == nil {
			reg, err := devices.OpenRegistry(db)
			if err != nil {
				_ = db.Shutdown(context.Background())
				return nil, nil, err
			}
			return localAdmin{reg}, func() { _ = db.Shutdown(context.Background()) }, nil
		}
		if !errors.Is(err, storage.ErrInUse) && !strings.Contains(err.Error(), "Cannot acquire directory lock") {
			return nil, nil, err
		}
		if a, ok := localAPIAdmin(cfg.Storage.Dir); ok && token == "" {
			return a, func() {}, nil // the running broker said where and how
		}
		if cfg.HTTP.Addr == "" {
			return nil, nil, errors.New("a running broker holds the data directory and http.addr is empty: no admin API to use")
		}
		host, port, _ := net.SplitHostPort(cfg.HTTP.Addr)
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			host = "127.0.0.1"
		}
		server = "http://" + net.JoinHostPort(host, port)
	}
	if token == "" {
		var err error
		if token, err = cfg.Auth.AdminTokenValue(); err != nil {
			return nil, nil, err
		}
	}
	if token == "" {
		return nil, nil, errors.New("the broker is running (its data directory is locked): set auth.admin_token, or pass --token")
	}
	return &apiAdmin{base: strings.TrimSuffix(server, "/"), token: token, client: &http.Client{Timeout: 10 * time.Second}}, func() {}, nil
}

type localAdmin struct{ r *devices.Registry }

func (l localAdmin) Add(n devices.NewDevice) (devices.Device, string, error) { return l.r.Add(n) }
func (l localAdmin) List(online *bool) ([]devices.Device, error)             { return l.r.List(online), nil }
func (l localAdmin) Get(id string) (devices.Device, error)                   { return l.r.Get(id) }
func (l localAdmin) Update(id string, u devices.Update) (devices.Device, error) {
	return l.r.Update(id, u)
}
func (l localAdmin) Rotate(id string) (string, error) { return l.r.Rotate(id) }
func (l localAdmin) Remove(id string) error           { return l.r.Remove(id) }

// apiAdmin talks to /api/v1/devices.
type apiAdmin struct {
	base, token string
	client      *http.Client
}

func (a *apiAdmin) do(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, a.base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		var e struct{ Error string }
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s %s: %s (%s)", method, path, e.Error, resp.Status)
		}
		return fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

type created struct {
	Device devices.Device `json:"device"`
	Secret string         `json:"secret"`
}

func (a *apiAdmin) Add(n devices.NewDevice) (devices.Device, string, error) {
	var c created
	err := a.do(http.MethodPost, "/api/v1/devices", n, &c)
	return c.Device, c.Secret, err
}

func (a *apiAdmin) List(online *bool) ([]devices.Device, error) {
	q := ""
	if online != nil {
		q = "?online=" + fmt.Sprint(*online)
	}
	var out struct{ Devices []devices.Device }
	err := a.do(http.MethodGet, "/api/v1/devices"+q, nil, &out)
	return out.Devices, err
}

func (a *apiAdmin) Get(id string) (devices.Device, error) {
	var d devices.Device
	err := a.do(http.MethodGet, "/api/v1/devices/"+url.PathEscape(id), nil, &d)
	return d, err
}

func (a *apiAdmin) Update(id string, u devices.Update) (devices.Device, error) {
	var d devices.Device
	err := a.do(http.MethodPatch, "/api/v1/devices/"+url.PathEscape(id), u, &d)
	return d, err
}

func (a *apiAdmin) Rotate(id string) (string, error) {
	var c created
	err := a.do(http.MethodPost, "/api/v1/devices/"+url.PathEscape(id)+"/rotate", nil, &c)
	return c.Secret, err
}

func (a *apiAdmin) Remove(id string) error {
	return a.do(http.MethodDelete, "/api/v1/devices/"+url.PathEscape(id), nil, nil)
}

// runToken mints an HS256 token with the configured secret.
func runToken(args, environ []string, stdout, stderr io.Writer) int {
	fs := newFlags("token", stderr)
	sub := fs.String("sub", "", "subject: the user or service name (%u in rules)")
	role := fs.String("role", "", "role (matched by role:R rules; admin may use the admin API)")
	ttl := fs.Duration("ttl", time.Hour, "lifetime")
	var pubs, subs stringList
	fs.Var(&pubs, "publish", "topic filter the holder may publish to, repeatable")
	fs.Var(&subs, "subscribe", "topic filter the holder may subscribe to, repeatable")
	if err := fs.Parse(args); err != nil {
		return reportFlagErr(err, stderr)
	}
	if *sub == "" || *ttl <= 0 {
		fmt.Fprintln(stderr, "beacon: token needs --sub NAME and a positive --ttl")
		return 2
	}
	cfg, err := configFromFlags(fs, environ)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 2
	}
	secret, err := cfg.Auth.JWTSecretValue()
	if err != nil || secret == "" {
		fmt.Fprintln(stderr, "beacon: token signs with auth.jwt_secret (or auth.jwt_secret_file), which is not set")
		return 1
	}
	var c devices.Claims
	c.Subject = *sub
	now := time.Now()
	c.IssuedAt = jwt.NewNumericDate(now)
	c.Expiry = jwt.NewNumericDate(now.Add(*ttl))
	if cfg.Auth.JWTIssuer != "" {
		c.Issuer = cfg.Auth.JWTIssuer
	}
	if cfg.Auth.JWTAudience != "" {
		c.Audience = jwt.Audience{cfg.Auth.JWTAudience}
	}
	if len(pubs) > 0 || len(subs) > 0 || *role != "" {
		c.Beacon = &devices.BeaconClaims{Pub: pubs, Sub: subs, Role: *role}
	}
	tok, err := devices.MintHS256([]byte(secret), c)
	if err != nil {
		fmt.Fprintf(stderr, "beacon: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, tok)
	return 0
}
