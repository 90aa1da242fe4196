export const dynamic = 'force-dynamic';

export default function Page() {
  return <h1>Hello from worker {process.env.NODE_APP_INSTANCE}</h1>;
}
