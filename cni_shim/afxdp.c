// afxdp CNI shim: the executable a CNI runtime (Multus, podman, containerd...)
// runs as plugin type "afxdp". It has no CNI logic: it forwards its CNI
// environment and stdin to afxdpd over a unix socket, then prints the reply's
// stdout and exits with the reply's code. It runs on the host, where no Python
// is guaranteed, so it is a small static C program.
//
// Frames (both directions) are netstrings: "<decimal length>:<bytes>,".
//   request: netstring(env) netstring(stdin)
//            env is "KEY=VALUE\0" entries: the CNI_* variables, TRACEPARENT
//            and TRACESTATE (W3C trace context) when set.
//   reply:   netstring(exit code, decimal) netstring(stdout) netstring(stderr)
//
// The socket is the netconf's top-level "daemonSocket" string, else
// /run/afxdp/cni.sock. When afxdpd cannot be reached: VERSION is answered
// here; DEL is queued durably in <socket dir>/del-queue/ for afxdpd to replay
// when it starts, and succeeds; STATUS fails with code 50; anything else fails
// with code 11 (try again later).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/afxdp/cni.sock"
#define MAX_STDIN (8u << 20)
#define MAX_FRAME (16u << 20)
#define CONNECT_TIMEOUT_S 5
#define REPLY_TIMEOUT_S 300
#define SUPPORTED "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]"

static const char *FORWARDED[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME",
				  "CNI_ARGS",    "CNI_PATH",	"TRACEPARENT", "TRACESTATE"};

struct buf {
	char *data;
	size_t len, cap;
};

static int buf_add(struct buf *b, const void *data, size_t len)
{
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

// The string value of the first "key": "value" in JSON text, when it has no
// escapes; NULL otherwise. Enough to find daemonSocket and cniVersion.
static char *json_string(const char *json, size_t len, const char *key)
{
	size_t klen = strlen(key);
	for (const char *p = json; p && (size_t)(p - json) + klen + 2 < len; p++) {
		p = memchr(p, '"', len - (size_t)(p - json));
		if (!p || (size_t)(p - json) + klen + 2 >= len)
			return NULL;
		if (strncmp(p + 1, key, klen) != 0 || p[klen + 1] != '"')
			continue;
		const char *v = p + klen + 2, *end = json + len;
		while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r'))
			v++;
		if (v >= end || *v != ':')
			continue;
		for (v++; v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r'); v++)
			;
		if (v >= end || *v != '"')
			continue;
		const char *s = ++v;
		while (v < end && *v != '"' && *v != '\\' && (unsigned char)*v >= 0x20)
			v++;
		if (v >= end || *v != '"' || v == s)
			return NULL;
		return strndup(s, (size_t)(v - s));
	}
	return NULL;
}

static void json_escaped(FILE *out, const char *s)
{
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			fprintf(out, "\\%c", c);
		else if (c < 0x20)
			fprintf(out, "\\u%04x", c);
		else
			fputc(c, out);
	}
}

static const char *g_version = "1.1.0";

static int cni_error(int code, const char *details, const char *fmt, ...)
{
	char msg[1024];
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

static int read_all(int fd, struct buf *b, size_t limit)
{
	char chunk[65536];
	for (;;) {
		ssize_t n = read(fd, chunk, sizeof(chunk));
		if (n == 0)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (b->len + (size_t)n > limit) {
			errno = EFBIG;
			return -1;
		}
		if (buf_add(b, chunk, (size_t)n))
			return -1;
	}
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

// Parse netstring number idx of b; 0 on success.
static int netstring_at(const struct buf *b, int idx, const char **data, size_t *len)
{
	size_t pos = 0;
	for (int i = 0; i <= idx; i++) {
		size_t n = 0, digits = 0;
		while (pos < b->len && b->data[pos] >= '0' && b->data[pos] <= '9' && digits < 9) {
			n = n * 10 + (size_t)(b->data[pos++] - '0');
			digits++;
		}
		if (!digits || pos >= b->len || b->data[pos] != ':' || n > MAX_FRAME || n > b->len - pos - 1 ||
		    pos + 1 + n >= b->len || b->data[pos + 1 + n] != ',')
			return -1;
		*data = b->data + pos + 1;
		*len = n;
		pos += n + 2;
	}
	return 0;
}

static int connect_daemon(const char *path)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(addr.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(addr.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	// On unix sockets connect() and send() obey SO_SNDTIMEO.
	struct timeval snd = {.tv_sec = CONNECT_TIMEOUT_S}, rcv = {.tv_sec = REPLY_TIMEOUT_S};
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &snd, sizeof(snd));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &rcv, sizeof(rcv));
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
		int saved = errno;
		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

// Write the request into <socket dir>/del-queue/ so afxdpd replays it on start.
static int queue_del(const char *socket_path, const struct buf *request)
{
	char *copy = strdup(socket_path);
	if (!copy)
		return -1;
	char dir[4096], tmp[4200], final[4200];
	snprintf(dir, sizeof(dir), "%s/del-queue", dirname(copy));
	// afxdpd may never have run on this node: make its run dir too.
	char *parent = strdup(dir);
	if (!parent)
		return -1;
	int made = mkdir(dirname(parent), 0755);
	free(parent);
	free(copy);
	if ((made != 0 && errno != EEXIST) || (mkdir(dir, 0700) != 0 && errno != EEXIST))
		return -1;
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(final, sizeof(final), "%s/%lld%09ld-%d.del", dir, (long long)ts.tv_sec, ts.tv_nsec, getpid());
	snprintf(tmp, sizeof(tmp), "%s/.%lld%09ld-%d.tmp", dir, (long long)ts.tv_sec, ts.tv_nsec, getpid());
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		return -1;
	if (write_all(fd, request->data, request->len) || fsync(fd)) {
		close(fd);
		unlink(tmp);
		return -1;
	}
	close(fd);
	if (rename(tmp, final)) {
		unlink(tmp);
		return -1;
	}
	int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd >= 0) {
		fsync(dfd);
		close(dfd);
	}
	return 0;
}

int main(void)
{
	struct buf in = {0}, env = {0}, request = {0}, reply = {0};
	const char *command = getenv("CNI_COMMAND");
	if (!command)
		command = "";

	if (read_all(STDIN_FILENO, &in, MAX_STDIN)) {
		if (errno == EFBIG)
			return cni_error(6, NULL, "network configuration is larger than %u bytes", MAX_STDIN);
		return cni_error(5, strerror(errno), "cannot read the network configuration");
	}
	char *version = in.len ? json_string(in.data, in.len, "cniVersion") : NULL;
	if (version)
		g_version = version;
	char *socket_path = in.len ? json_string(in.data, in.len, "daemonSocket") : NULL;
	if (!socket_path)
		socket_path = DEFAULT_SOCKET;

	for (size_t i = 0; i < sizeof(FORWARDED) / sizeof(*FORWARDED); i++) {
		const char *v = getenv(FORWARDED[i]);
		if (v && (buf_add(&env, FORWARDED[i], strlen(FORWARDED[i])) || buf_add(&env, "=", 1) ||
			  buf_add(&env, v, strlen(v)) || buf_add(&env, "\0", 1)))
			return cni_error(5, NULL, "out of memory");
	}
	if (buf_netstring(&request, env.data ? env.data : "", env.len) ||
	    buf_netstring(&request, in.data ? in.data : "", in.len))
		return cni_error(5, NULL, "out of memory");

	int fd = connect_daemon(socket_path);
	if (fd < 0) {
		int err = errno;
		if (strcmp(command, "VERSION") == 0) {
			printf("{\"cniVersion\":\"");
			json_escaped(stdout, g_version);
			printf("\",\"supportedVersions\":" SUPPORTED "}\n");
			return 0;
		}
		if (strcmp(command, "DEL") == 0) {
			if (queue_del(socket_path, &request) == 0)
				return 0;
			return cni_error(11, strerror(errno), "afxdpd at %s is unreachable and the DEL could not be queued",
					 socket_path);
		}
		if (strcmp(command, "STATUS") == 0)
			return cni_error(50, strerror(err), "afxdpd at %s is not running", socket_path);
		return cni_error(11, strerror(err), "afxdpd at %s is unreachable; try again later", socket_path);
	}
	if (write_all(fd, request.data, request.len) || shutdown(fd, SHUT_WR))
		return cni_error(11, strerror(errno), "sending the request to afxdpd at %s failed", socket_path);
	if (read_all(fd, &reply, 3 * (MAX_FRAME + 16)))
		return cni_error(11, strerror(errno), "reading afxdpd's reply from %s failed", socket_path);
	close(fd);

	const char *code_s, *out, *err_s;
	size_t code_len, out_len, err_len;
	if (netstring_at(&reply, 0, &code_s, &code_len) || netstring_at(&reply, 1, &out, &out_len) ||
	    netstring_at(&reply, 2, &err_s, &err_len) || code_len == 0 || code_len > 3)
		return cni_error(5, NULL, "afxdpd at %s sent a malformed reply", socket_path);
	int code = 0;
	for (size_t i = 0; i < code_len; i++) {
		if (code_s[i] < '0' || code_s[i] > '9')
			return cni_error(5, NULL, "afxdpd at %s sent a malformed reply", socket_path);
		code = code * 10 + (code_s[i] - '0');
	}
	if (write_all(STDOUT_FILENO, out, out_len) || write_all(STDERR_FILENO, err_s, err_len))
		return 1;
	return code > 255 ? 1 : code;
}
