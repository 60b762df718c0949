import net from 'node:net';

/**
 * A TCP proxy in front of a server that can fall silent: while `silent`, it keeps accepting and
 * reading both sides (the kernel acknowledges everything, as a network black hole past the first
 * hop or a paused proxy does) but forwards nothing; `speak()` sends what it held, in order, and
 * forwards again.
 */
export class SilentProxy {
  private silent = false;
  private readonly held: (() => void)[] = [];
  private readonly sockets = new Set<net.Socket>();

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
  ) {}

  static async start(target: { host: string; port: number }): Promise<SilentProxy> {
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const proxy = new SilentProxy(server, (server.address() as net.AddressInfo).port);
    server.on('connection', (client) => proxy.join(client, net.connect(target.port, target.host)));
    return proxy;
  }

  /** A proxy to the server a URL names (REDIS_URL, DATABASE_URL), on its scheme's port when it names none. */
  static async to(url: string, defaultPort: number): Promise<SilentProxy> {
    const target = new URL(url);
    return SilentProxy.start({ host: target.hostname, port: Number(target.port || defaultPort) });
  }

  /** The same URL, through this proxy. */
  url(of: string): string {
    const url = new URL(of);
    url.host = `127.0.0.1:${this.port}`;
    return url.toString();
  }

  fallSilent(): void {
    this.silent = true;
  }

  speak(): void {
    this.silent = false;
    for (const send of this.held.splice(0)) send();
  }

  async close(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private join(client: net.Socket, server: net.Socket): void {
    for (const [from, to] of [
      [client, server],
      [server, client],
    ] as const) {
      this.sockets.add(from);
      from.on('data', (chunk) => {
        const send = () => to.write(chunk);
        if (this.silent) this.held.push(send);
        else send();
      });
      // One side gone: the other goes too (unless silent, when nothing reaches the other side).
      from.on('close', () => {
        this.sockets.delete(from);
        const end = () => to.destroy();
        if (this.silent) this.held.push(end);
        else end();
      });
      from.on('error', () => undefined);
    }
  }
}
