package bridge

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"mime"
	"net/http"
	"path"
	"strings"
	"time"
)

// dashboardFiles is the live dashboard: plain HTML, CSS and JavaScript
// modules, no build step and nothing loaded from elsewhere.
//
//go:embed dashboard
var dashboardFiles embed.FS

// DashboardCSP allows the dashboard's own files and same-origin requests
// only: no inline script or style, no framing.
const DashboardCSP = "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"

type dashboardAsset struct {
	data        []byte
	ctype, etag string
}

var dashboardTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".css":  "text/css; charset=utf-8",
	".svg":  "image/svg+xml",
}

// Dashboard serves the live dashboard (index at /). Mount it at the root;
// the page reaches /events and /api/v1/ by relative URLs.
func Dashboard() http.Handler {
	assets := map[string]dashboardAsset{}
	err := fs.WalkDir(dashboardFiles, "dashboard", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := dashboardFiles.ReadFile(p)
		if err != nil {
			return err
		}
		ctype, ok := dashboardTypes[path.Ext(p)]
		if !ok {
			if ctype = mime.TypeByExtension(path.Ext(p)); ctype == "" {
				ctype = "application/octet-stream"
			}
		}
		sum := sha256.Sum256(b)
		assets[strings.TrimPrefix(p, "dashboard/")] = dashboardAsset{b, ctype, `"` + hex.EncodeToString(sum[:12]) + `"`}
		return nil
	})
	if err != nil {
		panic("bridge: embedded dashboard: " + err.Error())
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", DashboardCSP)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			h.Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		name := strings.TrimPrefix(r.URL.Path, "/")
		if name == "" {
			name = "index.html"
		}
		a, ok := assets[name]
		if !ok {
			http.NotFound(w, r)
			return
		}
		h.Set("Content-Type", a.ctype)
		h.Set("Cache-Control", "no-cache")
		h.Set("ETag", a.etag)
		http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(a.data))
	})
}
