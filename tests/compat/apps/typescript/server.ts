// TypeScript run as is through `node --import tsx` (node_args), no build step.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';

interface WhoAmI {
  instance: string | undefined;
  pid: number;
  node: string;
}

const whoami = (): WhoAmI => ({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version });

const server = createServer((req: IncomingMessage, res: ServerResponse): void => {
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify(whoami()));
});

const port: number = 3000;
server.listen(port, (): void => console.log(`typescript app listening on ${port}`));
