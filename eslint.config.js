import neostandard from 'neostandard'

// The style of the Fastify organisation (STYLE.md rule 14), TypeScript included.
export default neostandard({
  ts: true,
  ignores: ['dist/**', 'client/dist/**', 'coverage/**', '.tap/**', 'data/**', 'test-output/**']
})
