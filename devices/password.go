package devices

import (
	"bufio"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Secret schemes: how a device's secret is kept (Device.SecretScheme).
//
//   - "" (Beacon's own): SHA-256 of a server-generated 256-bit secret.
//   - SchemePBKDF2SHA512: Mosquitto 2's "$7$iterations$salt$hash"
//     (PBKDF2-HMAC-SHA512, 64-byte key); imported from a mosquitto_passwd
//     file, and used for secrets chosen with --secret-stdin.
//   - SchemeSHA512: Mosquitto 1.x's "$6$salt$hash" (SHA-512 of the
//     password followed by the salt); imported only.
const (
	SchemePBKDF2SHA512 = "pbkdf2-sha512"
	SchemeSHA512       = "sha512"
)

// Limits on chosen and imported secrets.
const (
	// MinChosenSecret is the shortest secret a user may choose.
	MinChosenSecret = 16
	// MaxChosenSecret bounds what is hashed.
	MaxChosenSecret = 1024
	// MaxImportIterations bounds the work one login can cost: a passwd
	// file with a huge iteration count would make every CONNECT a denial
	// of service.
	MaxImportIterations = 1_000_000
	// chosenIterations is the PBKDF2 work for a chosen secret (Mosquitto 2
	// uses 101 by default, later releases 1,000).
	chosenIterations = 10_000
)

// ErrBadHash is an imported password hash Beacon cannot read.
var ErrBadHash = errors.New("unsupported password hash")

// passwordHash is a parsed Mosquitto password hash.
type passwordHash struct {
	scheme     string
	iterations int
	salt, sum  []byte
}

// parseMosquittoHash reads "$7$iterations$salt$hash" or "$6$salt$hash"
// (standard base64 with padding, as mosquitto_passwd writes them). Mosquitto
// accepts salts of 12 or 64 bytes and a 64-byte hash.
func parseMosquittoHash(s string) (passwordHash, error) {
	parts := strings.Split(s, "$")
	bad := func(msg string) (passwordHash, error) {
		return passwordHash{}, fmt.Errorf("%w: %s", ErrBadHash, msg)
	}
	if len(parts) < 2 || parts[0] != "" {
		return bad("not a $6$ or $7$ hash")
	}
	var h passwordHash
	var salt64, sum64 string
	switch {
	case parts[1] == "7" && len(parts) == 5:
		n, err := strconv.Atoi(parts[2])
		if err != nil || n < 1 {
			return bad("$7$: iterations must be a positive number")
		}
		if n > MaxImportIterations {
			return bad(fmt.Sprintf("$7$: %d iterations is more than %d", n, MaxImportIterations))
		}
		h = passwordHash{scheme: SchemePBKDF2SHA512, iterations: n}
		salt64, sum64 = parts[3], parts[4]
	case parts[1] == "6" && len(parts) == 4:
		h = passwordHash{scheme: SchemeSHA512}
		salt64, sum64 = parts[2], parts[3]
	case parts[1] == "7" || parts[1] == "6":
		return bad("$" + parts[1] + "$: wrong number of fields")
	default:
		return bad(fmt.Sprintf("scheme $%s$ (Beacon reads $6$ and $7$; argon2id is not supported)", parts[1]))
	}
	var err error
	if h.salt, err = base64.StdEncoding.DecodeString(salt64); err != nil || (len(h.salt) != 12 && len(h.salt) != 64) {
		return bad("salt is not 12 or 64 bytes of base64")
	}
	if h.sum, err = base64.StdEncoding.DecodeString(sum64); err != nil || len(h.sum) != sha512.Size {
		return bad("hash is not 64 bytes of base64")
	}
	return h, nil
}

func (h passwordHash) String() string {
	salt, sum := base64.StdEncoding.EncodeToString(h.salt), base64.StdEncoding.EncodeToString(h.sum)
	if h.scheme == SchemeSHA512 {
		return "$6$" + salt + "$" + sum
	}
	return fmt.Sprintf("$7$%d$%s$%s", h.iterations, salt, sum)
}

// derive computes the hash of password with h's scheme and parameters.
func (h passwordHash) derive(password string) []byte {
	switch h.scheme {
	case SchemeSHA512:
		d := sha512.New()
		d.Write([]byte(password))
		d.Write(h.salt)
		return d.Sum(nil)
	case SchemePBKDF2SHA512:
		k, err := pbkdf2.Key(sha512.New, password, h.salt, h.iterations, sha512.Size)
		if err != nil {
			return nil
		}
		return k
	}
	return nil
}

// verify compares in constant time.
func (h passwordHash) verify(password string) bool {
	got := h.derive(password)
	return len(got) == len(h.sum) && subtle.ConstantTimeCompare(got, h.sum) == 1
}

// hashChosen hashes a secret chosen by a person: PBKDF2-SHA512 with a
// random 64-byte salt, stored in Mosquitto's $7$ form.
func hashChosen(secret string) (passwordHash, error) {
	h := passwordHash{scheme: SchemePBKDF2SHA512, iterations: chosenIterations, salt: make([]byte, 64)}
	if _, err := rand.Read(h.salt); err != nil {
		return passwordHash{}, err
	}
	h.sum = h.derive(secret)
	return h, nil
}

// CheckChosenSecret tells whether secret may be chosen for a device.
func CheckChosenSecret(secret string) error {
	switch {
	case len(secret) < MinChosenSecret:
		return &FieldError{"secret", fmt.Sprintf("shorter than %d bytes", MinChosenSecret)}
	case len(secret) > MaxChosenSecret:
		return &FieldError{"secret", fmt.Sprintf("longer than %d bytes", MaxChosenSecret)}
	case strings.ContainsAny(secret, "\r\n\x00"):
		return &FieldError{"secret", "contains a line break or NUL"}
	}
	return nil
}

// PasswdEntry is one line of a mosquitto_passwd file.
type PasswdEntry struct {
	Username string
	Hash     string // "$7$..." or "$6$..."
	Line     int
}

// ParsePasswdFile reads a Mosquitto password file: "username:hash" lines;
// blank lines and lines starting with '#' are skipped. Every hash is
// checked; a line Beacon cannot use is an error naming the line (never
// quoting the hash).
func ParsePasswdFile(name string, r io.Reader) ([]PasswdEntry, error) {
	var out []PasswdEntry
	seen := map[string]int{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 64<<10)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimRight(sc.Text(), "\r")
		if strings.TrimSpace(line) == "" || strings.HasPrefix(line, "#") {
			continue
		}
		user, hash, ok := strings.Cut(line, ":")
		user, hash = strings.TrimSpace(user), strings.TrimSpace(hash) // as Mosquitto reads them
		switch {
		case !ok || user == "":
			return nil, fmt.Errorf("%s:%d: expected username:hash", name, n)
		case !ValidID(user):
			return nil, fmt.Errorf("%s:%d: username %q cannot be a device id (1-64 letters, digits, '.', '_' or '-')", name, n, user)
		case seen[user] > 0:
			return nil, fmt.Errorf("%s:%d: username %q already on line %d", name, n, user, seen[user])
		}
		if !strings.HasPrefix(hash, "$") {
			return nil, fmt.Errorf("%s:%d: user %q has a plain-text password: hash the file first (mosquitto_passwd -U)", name, n, user)
		}
		if _, err := parseMosquittoHash(hash); err != nil {
			return nil, fmt.Errorf("%s:%d: user %q: %w", name, n, user, err)
		}
		seen[user] = n
		out = append(out, PasswdEntry{Username: user, Hash: hash, Line: n})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	return out, nil
}
