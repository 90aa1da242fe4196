export const dynamic = 'force-dynamic';

export function GET() {
  return Response.json({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version });
}
