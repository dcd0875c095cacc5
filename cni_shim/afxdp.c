// afxdp CNI shim: the executable a CNI runtime (Multus, podman, containerd...)
// runs as plugin type "afxdp". It has no CNI logic: it forwards its CNI
// environment and stdin to afxdpd over a unix socket, then prints the reply's
// stdout and exits with the reply's code. It runs where no Python is
// guaranteed, so it is a small static C program.
//
// Frames (both directions) are netstrings: "<decimal length>:<bytes>,".
//   request: netstring(env) netstring(stdin)
//            env is "KEY=VALUE\0" entries: the CNI_* variables, TRACEPARENT
//            and TRACESTATE (W3C trace context) when set.
//   reply:   netstring(exit code, decimal) netstring(stdout) netstring(stderr)
//
// Where afxdpd is. The shim runs as root with the netconf of whoever wrote the
// NetworkAttachmentDefinition, so the netconf alone never chooses the socket:
// the shim only talks to sockets in ALLOWED DIRECTORIES, and only queues DELs
// there. The allowed directories are
//   - the lines of "afxdp.conf" beside the shim's own executable (the file
//     /proc/self/exe names, so a symlink to the shim does not move it), written
//     by `afxdpctl install-cni --allow-dir D`: one absolute directory per line,
//     '#' comments; when that file exists it REPLACES the defaults;
//   - else the defaults: /run/afxdp (the shim runs on the host: Multus thin
//     plugin, podman, a plain runtime) and /host/run/afxdp (the Multus thick
//     plugin runs delegates inside its daemon's container, where the host's
//     /run is mounted at /host/run).
// A socket is allowed when the real path of its directory (symlinks resolved,
// ".." refused) is an allowed directory or below one (compared with the
// allowed directory's real path). The shim tries, in order: the netconf's
// top-level "daemonSocket" string (a CNI error, code 7, when it is not
// allowed), then "<allowed dir>/cni.sock" for each allowed directory; the first
// socket that accepts a connection gets the request.
//
// When no candidate accepts: VERSION is answered here; DEL is queued durably in
// <dir>/del-queue/ of the first candidate whose directory exists (else an
// allowed directory is created, as afxdpd may never have run on this node) for
// afxdpd to replay when it starts, and succeeds; STATUS fails with code 50;
// anything else fails with code 11 (try again later).
//
// Every failure of the shim itself is one CNI error JSON on stdout and exit 1.
// SIGPIPE is ignored (a peer or runtime that hangs up is an error, never a
// signal death), and the whole exchange with afxdpd has one deadline.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define CONF_NAME "afxdp.conf"
#define SOCKET_NAME "cni.sock"
#define QUEUE_NAME "del-queue"
#define MAX_CONF (64u << 10)
#define MAX_DIRS 16
#define MAX_CANDIDATES (MAX_DIRS + 1)
#define MAX_STDIN (1u << 20) // afxdpd refuses a larger field (cni/frame.py MAX_FIELD)
#define MAX_REPLY (4u << 20) // a CNI result is a few KiB; this bounds our output
#define CONNECT_TIMEOUT_S 5
#define REPLY_TIMEOUT_S 300
#define SUPPORTED "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]"

static const char *DEFAULT_DIRS[] = {"/run/afxdp", "/host/run/afxdp"};
static const char *FORWARDED[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME",
				  "CNI_ARGS",    "CNI_PATH",	"TRACEPARENT", "TRACESTATE"};

struct buf {
	char *data;
	size_t len, cap;
};

static int buf_add(struct buf *b, const void *data, size_t len)
{
	if (len > SIZE_MAX / 4 - b->len) {
		errno = ENOMEM;
		return -1;
	}
	if (b->len + len + 1 > b->cap) {
		size_t cap = (b->cap ? b->cap * 2 : 4096);
		while (cap < b->len + len + 1)
			cap *= 2;
		char *p = realloc(b->data, cap);
		if (!p)
			return -1;
		b->data = p;
		b->cap = cap;
	}
	memcpy(b->data + b->len, data, len);
	b->len += len;
	b->data[b->len] = '\0';
	return 0;
}

static int buf_netstring(struct buf *b, const char *data, size_t len)
{
	char head[32];
	int n = snprintf(head, sizeof(head), "%zu:", len);
	return buf_add(b, head, (size_t)n) || buf_add(b, data, len) || buf_add(b, ",", 1);
}

enum found { ABSENT, FOUND, UNPARSED };

// The string value of the first "key": "value" in JSON text. FOUND (*out set,
// malloc'd) when the value is a non-empty string without escapes or control
// characters; UNPARSED when the key is there with any other value. Enough to
// find daemonSocket and cniVersion without a JSON parser.
static enum found json_string(const char *json, size_t len, const char *key, char **out)
{
	size_t klen = strlen(key);
	const char *end = json + len;
	for (const char *p = json; p < end; p++) {
		p = memchr(p, '"', (size_t)(end - p));
		if (!p || (size_t)(end - p) < klen + 2)
			return ABSENT;
		if (memcmp(p + 1, key, klen) != 0 || p[klen + 1] != '"')
			continue;
		const char *v = p + klen + 2;
		while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r'))
			v++;
		if (v >= end || *v != ':')
			continue; // the key's text inside some string value
		for (v++; v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r'); v++)
			;
		if (v >= end || *v != '"')
			return UNPARSED;
		const char *s = ++v;
		while (v < end && *v != '"' && *v != '\\' && (unsigned char)*v >= 0x20)
			v++;
		if (v >= end || *v != '"' || v == s)
			return UNPARSED;
		*out = strndup(s, (size_t)(v - s));
		return *out ? FOUND : UNPARSED;
	}
	return ABSENT;
}

// Length of the valid UTF-8 sequence at s (NUL-terminated), 0 when invalid.
static size_t utf8_len(const unsigned char *s)
{
	unsigned char c = s[0];
	size_t n;
	uint32_t cp, min;
	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf)
		n = 2, cp = c & 0x1fu, min = 0x80;
	else if ((c & 0xf0) == 0xe0)
		n = 3, cp = c & 0x0fu, min = 0x800;
	else if (c >= 0xf0 && c <= 0xf4)
		n = 4, cp = c & 0x07u, min = 0x10000;
	else
		return 0;
	for (size_t i = 1; i < n; i++) { // stops at the NUL: it is not a continuation byte
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = (cp << 6) | (s[i] & 0x3fu);
	}
	if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return n;
}

// s as the inside of a JSON string. Paths and env values are bytes, not text:
// invalid UTF-8 becomes U+FFFD so that the output is always valid JSON.
static void json_escaped(FILE *out, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;
	while (*p) {
		size_t n = utf8_len(p);
		if (n == 0) {
			fputs("\\ufffd", out);
			p++;
		} else if (*p == '"' || *p == '\\') {
			fprintf(out, "\\%c", *p++);
		} else if (*p < 0x20) {
			fprintf(out, "\\u%04x", *p++);
		} else {
			fwrite(p, 1, n, out);
			p += n;
		}
	}
}

static const char *g_version = "1.1.0";

static int cni_error(int code, const char *details, const char *fmt, ...)
{
	char msg[4096];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	printf("{\"cniVersion\":\"");
	json_escaped(stdout, g_version);
	printf("\",\"code\":%d,\"msg\":\"", code);
	json_escaped(stdout, msg);
	printf("\",\"details\":\"");
	json_escaped(stdout, details ? details : "");
	printf("\"}\n");
	fflush(stdout);
	return 1;
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

// Wait for events on fd until deadline_ms (monotonic; < 0: no deadline).
static int wait_fd(int fd, short events, long long deadline_ms)
{
	for (;;) {
		int timeout = -1;
		if (deadline_ms >= 0) {
			long long left = deadline_ms - now_ms();
			if (left <= 0) {
				errno = ETIMEDOUT;
				return -1;
			}
			timeout = left > INT_MAX ? INT_MAX : (int)left;
		}
		struct pollfd p = {.fd = fd, .events = events};
		int n = poll(&p, 1, timeout);
		if (n > 0)
			return 0;
		if (n < 0 && errno != EINTR)
			return -1;
	}
}

// Read fd to its end into b; EFBIG when more than limit bytes come.
static int read_all(int fd, struct buf *b, size_t limit, long long deadline_ms)
{
	char chunk[65536];
	for (;;) {
		if (wait_fd(fd, POLLIN, deadline_ms))
			return -1;
		ssize_t n = read(fd, chunk, sizeof(chunk));
		if (n == 0)
			return 0;
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -1;
		}
		if ((size_t)n > limit - b->len) {
			errno = EFBIG;
			return -1;
		}
		if (buf_add(b, chunk, (size_t)n))
			return -1;
	}
}

static int send_all(int fd, const char *data, size_t len, long long deadline_ms)
{
	while (len) {
		if (wait_fd(fd, POLLOUT, deadline_ms))
			return -1;
		ssize_t n = send(fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -1;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

static int write_all(int fd, const char *data, size_t len)
{
	while (len) {
		ssize_t n = write(fd, data, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

// The three netstrings of a reply, making up all of it; 0 on success.
static int parse_reply(const struct buf *b, const char *field[3], size_t flen[3])
{
	size_t pos = 0;
	for (int i = 0; i < 3; i++) {
		size_t n = 0, digits = 0;
		while (pos < b->len && b->data[pos] >= '0' && b->data[pos] <= '9' && digits < 9) {
			n = n * 10 + (size_t)(b->data[pos++] - '0');
			digits++;
		}
		// pos < len after the ':' test, so the subtraction cannot wrap.
		if (!digits || pos >= b->len || b->data[pos] != ':' || n >= b->len - pos - 1 ||
		    b->data[pos + 1 + n] != ',')
			return -1;
		field[i] = b->data + pos + 1;
		flen[i] = n;
		pos += n + 2;
	}
	return pos == b->len ? 0 : -1;
}

// ---- where afxdpd may be -------------------------------------------------

struct allowed {
	char path[PATH_MAX]; // as configured
	char real[PATH_MAX]; // its real path, "" when it does not exist
};

struct candidate {
	char dir[PATH_MAX]; // real path when it exists, else the normalised path
	char name[sizeof(((struct sockaddr_un *)0)->sun_path)];
	int exists;	 // dir exists
	int allowed_dir; // dir is an allowed directory itself (may be created)
};

static struct allowed g_allowed[MAX_DIRS];
static size_t g_nallowed;
static char g_conf[PATH_MAX]; // the allowed-dirs file, for messages

// Normalise an absolute path: collapse "//" and "/./", drop a trailing '/'.
// -1 when it is not absolute, has a ".." component, or is too long.
static int normalise(const char *in, char *out, size_t size)
{
	size_t o = 0;
	if (in[0] != '/')
		return -1;
	for (const char *p = in; *p;) {
		while (*p == '/')
			p++;
		const char *e = strchrnul(p, '/');
		size_t n = (size_t)(e - p);
		if (n == 2 && p[0] == '.' && p[1] == '.')
			return -1;
		if (n && !(n == 1 && p[0] == '.')) {
			if (o + 1 + n + 1 > size)
				return -1;
			out[o++] = '/';
			memcpy(out + o, p, n);
			o += n;
		}
		p = e;
	}
	if (o == 0)
		out[o++] = '/';
	out[o] = '\0';
	return 0;
}

static int is_under(const char *path, const char *dir)
{
	size_t n = strlen(dir);
	if (!n)
		return 0;
	if (strcmp(dir, "/") == 0)
		return 1;
	return strncmp(path, dir, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

static void add_allowed(const char *path)
{
	struct allowed *a = &g_allowed[g_nallowed++];
	snprintf(a->path, sizeof(a->path), "%s", path);
	if (!realpath(a->path, a->real))
		a->real[0] = '\0';
}

// Fill g_allowed from the file beside our executable, else the defaults.
// Fails closed: a file that exists but is unreadable or invalid is an error.
static int load_allowed(char *err, size_t errsize)
{
	char exe[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	int fd = -1;
	if (n > 0) {
		exe[n] = '\0';
		char *slash = strrchr(exe, '/');
		size_t dlen = slash ? (size_t)(slash - exe) : 0;
		if (slash && dlen + 1 + sizeof(CONF_NAME) <= sizeof(g_conf)) {
			memcpy(g_conf, exe, dlen);
			memcpy(g_conf + dlen, "/" CONF_NAME, sizeof("/" CONF_NAME));
			fd = open(g_conf, O_RDONLY | O_CLOEXEC);
			if (fd < 0 && errno != ENOENT) {
				snprintf(err, errsize, "%s: %s", g_conf, strerror(errno));
				return -1;
			}
		}
	}
	if (fd < 0) {
		for (size_t i = 0; i < sizeof(DEFAULT_DIRS) / sizeof(*DEFAULT_DIRS); i++)
			add_allowed(DEFAULT_DIRS[i]);
		return 0;
	}
	struct buf text = {0};
	int rc = read_all(fd, &text, MAX_CONF, -1);
	close(fd);
	if (rc) {
		snprintf(err, errsize, "%s: %s", g_conf, strerror(errno));
		return -1;
	}
	int lineno = 0;
	for (char *line = text.data; line && line < text.data + text.len; lineno++) {
		char *nl = memchr(line, '\n', (size_t)(text.data + text.len - line));
		char *end = nl ? nl : text.data + text.len;
		while (end > line && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
			end--;
		*end = '\0';
		char norm[PATH_MAX];
		if (*line && *line != '#') {
			if (strlen(line) != (size_t)(end - line) || normalise(line, norm, sizeof(norm))) {
				snprintf(err, errsize, "%s line %d: not an absolute directory without '..'",
					 g_conf, lineno + 1);
				return -1;
			}
			if (g_nallowed == MAX_DIRS) {
				snprintf(err, errsize, "%s: more than %d directories", g_conf, MAX_DIRS);
				return -1;
			}
			add_allowed(norm);
		}
		line = nl ? nl + 1 : NULL;
	}
	free(text.data);
	return 0;
}

static int allowed_index(const char *dir, int real)
{
	for (size_t i = 0; i < g_nallowed; i++) {
		if (is_under(dir, g_allowed[i].real) || (!real && is_under(dir, g_allowed[i].path)))
			return (int)i;
	}
	return -1;
}

// "a, b" of the allowed directories, for messages.
static const char *allowed_list(void)
{
	static char out[2048];
	size_t o = 0;
	out[0] = '\0';
	for (size_t i = 0; i < g_nallowed && o < sizeof(out); i++)
		o += (size_t)snprintf(out + o, sizeof(out) - o, "%s%s", i ? ", " : "", g_allowed[i].path);
	return g_nallowed ? out : "none";
}

// A candidate for the socket at path; 0 when it is in an allowed directory.
static int make_candidate(const char *path, struct candidate *c)
{
	char norm[PATH_MAX];
	if (normalise(path, norm, sizeof(norm)) || strcmp(norm, "/") == 0)
		return -1;
	char *slash = strrchr(norm, '/');
	if (strlen(slash + 1) >= sizeof(c->name))
		return -1;
	strcpy(c->name, slash + 1);
	if (slash == norm)
		slash[1] = '\0';
	else
		*slash = '\0';
	// Resolve the directory (never the socket file itself: realpath of a
	// socket would also do, but afxdpd may not have created it yet).
	c->exists = realpath(norm, c->dir) != NULL;
	if (!c->exists)
		snprintf(c->dir, sizeof(c->dir), "%s", norm);
	int i = allowed_index(c->dir, c->exists);
	if (i < 0)
		return -1;
	c->allowed_dir = strcmp(norm, g_allowed[i].path) == 0 || strcmp(c->dir, g_allowed[i].real) == 0;
	return 0;
}

static int connect_candidate(const struct candidate *c)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	// By name inside the directory: the real directory path may be longer
	// than sun_path allows.
	strcpy(addr.sun_path, c->name);
	if (chdir(c->dir))
		return -1;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	// connect() on a unix socket waits (a full backlog) up to SO_SNDTIMEO.
	struct timeval snd = {.tv_sec = CONNECT_TIMEOUT_S};
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &snd, sizeof(snd));
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
		int saved = errno;
		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

static int mkdir_if_missing(const char *path, mode_t mode)
{
	return mkdir(path, mode) == 0 || errno == EEXIST ? 0 : -1;
}

// Write the request into <dir>/del-queue/ so afxdpd replays it on start.
static int queue_del(const char *dir, const struct buf *request)
{
	char queue[PATH_MAX], tmp[PATH_MAX], final[PATH_MAX];
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	int n1 = snprintf(queue, sizeof(queue), "%s/" QUEUE_NAME, dir);
	int n2 = snprintf(final, sizeof(final), "%s/%lld%09ld-%d.del", queue, (long long)ts.tv_sec,
			  ts.tv_nsec, getpid());
	int n3 = snprintf(tmp, sizeof(tmp), "%s/.%lld%09ld-%d.tmp", queue, (long long)ts.tv_sec,
			  ts.tv_nsec, getpid());
	if (n1 < 0 || n2 < 0 || n3 < 0 || (size_t)n3 >= sizeof(tmp) || (size_t)n2 >= sizeof(final)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	if (mkdir_if_missing(queue, 0700))
		return -1;
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return -1;
	if (write_all(fd, request->data, request->len) || fsync(fd)) {
		int saved = errno;
		close(fd);
		unlink(tmp);
		errno = saved;
		return -1;
	}
	close(fd);
	if (rename(tmp, final)) {
		int saved = errno;
		unlink(tmp);
		errno = saved;
		return -1;
	}
	int dfd = open(queue, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd >= 0) {
		fsync(dfd);
		close(dfd);
	}
	return 0;
}

// The directory to queue a DEL in: the first candidate's that exists, else
// (afxdpd never ran since boot) an allowed directory we may create.
static const char *del_dir(const struct candidate *c, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (c[i].exists)
			return c[i].dir;
	for (size_t i = 0; i < n; i++)
		if (c[i].allowed_dir && mkdir(c[i].dir, 0755) == 0)
			return c[i].dir;
	return NULL;
}

static int is_version(const char *s)
{
	size_t n = strlen(s);
	return n && n <= 16 && strspn(s, "0123456789.") == n;
}

int main(void)
{
	struct buf in = {0}, env = {0}, request = {0}, reply = {0};
	struct candidate cands[MAX_CANDIDATES];
	size_t ncands = 0;
	char err[PATH_MAX + 256];
	const char *command = getenv("CNI_COMMAND");
	if (!command)
		command = "";
	signal(SIGPIPE, SIG_IGN);

	if (read_all(STDIN_FILENO, &in, MAX_STDIN, -1)) {
		if (errno == EFBIG)
			return cni_error(6, NULL, "network configuration is larger than %u bytes", MAX_STDIN);
		return cni_error(5, strerror(errno), "cannot read the network configuration");
	}
	char *version = NULL, *daemon_socket = NULL;
	if (json_string(in.data, in.len, "cniVersion", &version) == FOUND && is_version(version))
		g_version = version;
	if (load_allowed(err, sizeof(err)))
		return cni_error(7, err, "the afxdp shim's allowed directories cannot be read");

	enum found ds = json_string(in.data, in.len, "daemonSocket", &daemon_socket);
	if (ds == UNPARSED)
		return cni_error(7, NULL, "daemonSocket: must be a non-empty string without escapes");
	if (ds == FOUND) {
		if (make_candidate(daemon_socket, &cands[ncands]))
			return cni_error(7, "allowed directories are set by afxdpctl install-cni --allow-dir",
					 "daemonSocket: %s is not an absolute path (without '..') in an allowed "
					 "directory (%s)",
					 daemon_socket, allowed_list());
		ncands++;
	}
	for (size_t i = 0; i < g_nallowed; i++) {
		char path[PATH_MAX + sizeof(SOCKET_NAME)];
		snprintf(path, sizeof(path), "%s/" SOCKET_NAME, g_allowed[i].path);
		struct candidate *c = &cands[ncands];
		if (make_candidate(path, c))
			continue;
		int dup = 0;
		for (size_t j = 0; j < ncands; j++)
			dup |= strcmp(cands[j].dir, c->dir) == 0 && strcmp(cands[j].name, c->name) == 0;
		if (!dup)
			ncands++;
	}

	for (size_t i = 0; i < sizeof(FORWARDED) / sizeof(*FORWARDED); i++) {
		const char *v = getenv(FORWARDED[i]);
		if (v && (buf_add(&env, FORWARDED[i], strlen(FORWARDED[i])) || buf_add(&env, "=", 1) ||
			  buf_add(&env, v, strlen(v)) || buf_add(&env, "\0", 1)))
			return cni_error(5, NULL, "out of memory");
	}
	if (buf_netstring(&request, env.data ? env.data : "", env.len) ||
	    buf_netstring(&request, in.data ? in.data : "", in.len))
		return cni_error(5, NULL, "out of memory");

	// Try every candidate; remember why each failed for the message.
	char tried[2048] = "";
	size_t tlen = 0;
	int fd = -1, last_err = ENOENT;
	const struct candidate *chosen = NULL;
	for (size_t i = 0; i < ncands && fd < 0; i++) {
		fd = connect_candidate(&cands[i]);
		if (fd >= 0) {
			chosen = &cands[i];
			break;
		}
		last_err = errno;
		if (tlen < sizeof(tried))
			tlen += (size_t)snprintf(tried + tlen, sizeof(tried) - tlen, "%s%s/%s (%s)",
						 tlen ? ", " : "", cands[i].dir, cands[i].name,
						 strerror(last_err));
	}
	if (!ncands)
		snprintf(tried, sizeof(tried), "no allowed directory (%s) exists", allowed_list());
	if (fd < 0) {
		if (strcmp(command, "VERSION") == 0) {
			printf("{\"cniVersion\":\"");
			json_escaped(stdout, g_version);
			printf("\",\"supportedVersions\":" SUPPORTED "}\n");
			return fflush(stdout) ? 1 : 0;
		}
		if (strcmp(command, "DEL") == 0) {
			const char *dir = del_dir(cands, ncands);
			if (dir && queue_del(dir, &request) == 0)
				return 0;
			return cni_error(11, dir ? strerror(errno) : "no allowed directory exists",
					 "afxdpd is unreachable and the DEL could not be queued; tried %s", tried);
		}
		if (strcmp(command, "STATUS") == 0)
			return cni_error(50, strerror(last_err), "afxdpd is not running; tried %s", tried);
		return cni_error(11, strerror(last_err), "afxdpd is unreachable; try again later; tried %s",
				 tried);
	}

	char where[PATH_MAX + sizeof(chosen->name) + 1];
	snprintf(where, sizeof(where), "%s/%s", chosen->dir, chosen->name);
	long long deadline = now_ms() + REPLY_TIMEOUT_S * 1000LL;
	if (send_all(fd, request.data, request.len, deadline) || shutdown(fd, SHUT_WR))
		return cni_error(11, strerror(errno), "sending the request to afxdpd at %s failed", where);
	if (read_all(fd, &reply, MAX_REPLY, deadline)) {
		if (errno == EFBIG)
			return cni_error(5, NULL, "afxdpd at %s sent a reply larger than %u bytes", where,
					 MAX_REPLY);
		return cni_error(11, strerror(errno), "reading afxdpd's reply from %s failed", where);
	}
	close(fd);

	const char *field[3];
	size_t flen[3];
	if (parse_reply(&reply, field, flen) || flen[0] == 0 || flen[0] > 3)
		return cni_error(5, NULL, "afxdpd at %s sent a malformed reply", where);
	int code = 0;
	for (size_t i = 0; i < flen[0]; i++) {
		if (field[0][i] < '0' || field[0][i] > '9')
			return cni_error(5, NULL, "afxdpd at %s sent a malformed reply", where);
		code = code * 10 + (field[0][i] - '0');
	}
	if (write_all(STDOUT_FILENO, field[1], flen[1]) || write_all(STDERR_FILENO, field[2], flen[2]))
		return 1;
	return code > 255 ? 1 : code;
}
