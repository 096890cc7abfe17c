package bridge

import (
	"io/fs"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
)

func TestDashboardServes(t *testing.T) {
	h := Dashboard()
	get := func(method, target string, header ...string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(method, target, nil)
		for i := 0; i+1 < len(header); i += 2 {
			r.Header.Set(header[i], header[i+1])
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w
	}

	w := get("GET", "/")
	if w.Code != http.StatusOK {
		t.Fatalf("GET /: %d", w.Code)
	}
	if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
		t.Errorf("GET /: Content-Type %q", ct)
	}
	if body := w.Body.String(); !strings.Contains(body, `<script type="module" src="app.js"></script>`) || !strings.Contains(body, `id="messages"`) {
		t.Errorf("GET /: not the dashboard:\n%s", body)
	}
	for k, v := range map[string]string{
		"Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
		"X-Content-Type-Options":  "nosniff",
		"Referrer-Policy":         "no-referrer",
	} {
		if got := w.Header().Get(k); got != v {
			t.Errorf("GET /: %s = %q, want %q", k, got, v)
		}
	}

	for path, want := range map[string]string{
		"/index.html": "text/html",
		"/app.js":     "text/javascript",
		"/chart.js":   "text/javascript",
		"/style.css":  "text/css",
	} {
		w := get("GET", path)
		if w.Code != http.StatusOK || !strings.HasPrefix(w.Header().Get("Content-Type"), want) {
			t.Errorf("GET %s: %d %q, want 200 %s", path, w.Code, w.Header().Get("Content-Type"), want)
		}
		if w.Header().Get("Content-Security-Policy") == "" {
			t.Errorf("GET %s: no CSP", path)
		}
	}

	if w := get("HEAD", "/app.js"); w.Code != http.StatusOK || w.Body.Len() != 0 {
		t.Errorf("HEAD /app.js: %d, %d bytes", w.Code, w.Body.Len())
	}
	etag := get("GET", "/app.js").Header().Get("ETag")
	if w := get("GET", "/app.js", "If-None-Match", etag); etag == "" || w.Code != http.StatusNotModified {
		t.Errorf("revalidation with ETag %q: %d", etag, w.Code)
	}
	for _, path := range []string{"/nope.js", "/dashboard/app.js", "/app.js/", "/../dashboard.go", "/api/v1/devices"} {
		if w := get("GET", path); w.Code != http.StatusNotFound {
			t.Errorf("GET %s: %d, want 404", path, w.Code)
		}
	}
	if w := get("POST", "/"); w.Code != http.StatusMethodNotAllowed || w.Header().Get("Allow") != "GET, HEAD" {
		t.Errorf("POST /: %d, Allow %q", w.Code, w.Header().Get("Allow"))
	}
}

// TestDashboardSafeDOM keeps network text out of the HTML parser: payloads,
// topics and errors reach the page through textContent only, and the page
// has no inline script or style (the CSP would block them anyway).
func TestDashboardSafeDOM(t *testing.T) {
	forbidden := []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"}
	var scripts int
	err := fs.WalkDir(dashboardFiles, "dashboard", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := dashboardFiles.ReadFile(p)
		if err != nil {
			return err
		}
		src := string(b)
		switch {
		case strings.HasSuffix(p, ".js"):
			scripts++
			for _, f := range forbidden {
				if strings.Contains(src, f) {
					t.Errorf("%s uses %s", p, f)
				}
			}
		case strings.HasSuffix(p, ".html"):
			for _, tag := range regexp.MustCompile(`(?is)<script\b[^>]*>`).FindAllString(src, -1) {
				if !strings.Contains(tag, "src=") {
					t.Errorf("%s: inline script %s", p, tag)
				}
			}
			if m := regexp.MustCompile(`(?is)<style\b|\sstyle\s*=|\son[a-z]+\s*=|javascript:`).FindString(src); m != "" {
				t.Errorf("%s: inline style or handler %q", p, m)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if scripts < 2 {
		t.Fatalf("found %d JavaScript files", scripts)
	}
}
