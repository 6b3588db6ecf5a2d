/*
 * sdnotify.c -- core.sd_notify: one datagram to systemd's notification
 * socket.
 */
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "pgl.h"

/*
 * core.sd_notify(address, message) -> true | nil, err
 * Sends one datagram to systemd's notification socket ($NOTIFY_SOCKET): a
 * path, or a name in the abstract namespace when it begins with '@'.  Here
 * rather than through luasocket, whose unix datagram sockets take the path
 * with strlen and so cannot name an abstract socket.  A socket per message:
 * nothing is held between messages, nothing is inherited by a fork.
 */
int pgl_core_sd_notify(lua_State *L) {
  size_t alen, mlen;
  const char *addr = luaL_checklstring(L, 1, &alen);
  const char *msg = luaL_checklstring(L, 2, &mlen);
  struct sockaddr_un sa;
  ssize_t r;
  int fd, err;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (alen < 2 || alen >= sizeof sa.sun_path || (addr[0] != '/' && addr[0] != '@') || memchr(addr, 0, alen)) {
    lua_pushnil(L);
    lua_pushliteral(L, "invalid notification socket address (an absolute path or @name expected)");
    return 2;
  }
  memcpy(sa.sun_path, addr, alen);
  if (addr[0] == '@')
    sa.sun_path[0] = '\0'; /* abstract: the name is the bytes after the NUL, unterminated */
  fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "cannot create a datagram socket: %s", strerror(errno));
    return 2;
  }
  do
    r = sendto(fd, msg, mlen, MSG_NOSIGNAL, (const struct sockaddr *)&sa,
               (socklen_t)(offsetof(struct sockaddr_un, sun_path) + alen));
  while (r < 0 && errno == EINTR);
  err = errno;
  close(fd);
  if (r < 0 || (size_t)r != mlen) {
    lua_pushnil(L);
    lua_pushfstring(L, "sending to the notification socket failed: %s", r < 0 ? strerror(err) : "short write");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}
